//! Topic creation: paystream's topics keep their whole history and accept
//! what the producers and dead letters send.

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use testkit::TestKafka;

#[tokio::test]
async fn topics_are_created_with_unlimited_retention_and_max_message_bytes() {
    let k = TestKafka::new(2).await;
    let admin: AdminClient<DefaultClientContext> =
        k.cfg.client_config("test-admin").create().unwrap();
    for spec in k.topology.specs() {
        let res = admin
            .describe_configs(
                &[ResourceSpecifier::Topic(&spec.name)],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        let config = res.into_iter().next().unwrap().unwrap();
        let retention = config
            .get("retention.ms")
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("{}: no retention.ms in {:?}", spec.name, config.entries));
        assert_eq!(retention, "-1", "{}", spec.name);
        let max = config
            .get("max.message.bytes")
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("{}: no max.message.bytes", spec.name));
        assert_eq!(
            max,
            streaming::admin::TOPIC_MAX_MESSAGE_BYTES.to_string(),
            "{}",
            spec.name
        );
    }
}
