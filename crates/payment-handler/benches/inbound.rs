//! Inbound payment requests per second: a backlog of N signed messages on
//! the inbound topic, consumed by a fresh handler until all N payments are
//! in its status projection. Twice in the same run, on the same broker and
//! database server: with the group commit (the inbound consumer submits a
//! batch's messages through it together, as concurrent `POST
//! /v1/payments` are) and without it (`--group-commit-max 0`: each message
//! decided and appended on its own, the batch's messages concurrently).
//! Needs a fresh broker (PAYSTREAM_TEST_BROKERS) and PostgreSQL
//! (PAYSTREAM_TEST_DATABASE_URL). Prints figures; asserts only that every
//! message became one payment.
//!
//!     cargo bench -p payment-handler --bench inbound [-- MESSAGES]

#![allow(clippy::float_arithmetic)] // rates, never money

use events::TopicKind;
use std::time::{Duration, Instant};
use storage::Db;
use streaming::{EventProducer, KafkaConfig};
use tokio_util::sync::CancellationToken;

async fn run(label: &str, brokers: &str, messages: usize, group_commit_max: usize) -> f64 {
    let kafka = KafkaConfig::local(
        brokers,
        &format!("bench{}in.", uuid::Uuid::now_v7().simple()),
        12,
    );
    streaming::admin::ensure_topics(&kafka, &kafka.topology().specs())
        .await
        .unwrap();
    let db_url = testkit::fresh_postgres_url().await.unwrap();
    let db = Db::connect(&db_url).await.unwrap();
    payment_handler::store::migrate(&db).await.unwrap();
    let key =
        payment_handler::store::create_client(&db, &events::ClientId::parse("bench-in").unwrap())
            .await
            .unwrap();
    // The backlog, produced before the handler starts.
    let producer = EventProducer::new(&kafka, "upstream").unwrap();
    let inbound = kafka.topology().name(TopicKind::Inbound);
    let sends = (0..messages).map(|i| {
        let mut env =
            events::samples::one_of_each("bench-in", &format!("in-{i}"), events::Timestamp::now())
                .remove(0);
        if let events::Event::PaymentRequested(p) = &mut env.event {
            // Distinct buyers keep the velocity rule out of the way.
            p.buyer_id = events::BuyerId::parse(&format!("buyer-{i}")).unwrap();
            p.metadata
                .insert("card_token".to_owned(), "tok_visa".to_owned());
        }
        let (producer, inbound, key) = (producer.clone(), inbound.clone(), key.clone());
        async move {
            payment_handler::inbound::append_signed(&producer, &inbound, &env, &key)
                .await
                .unwrap();
        }
    });
    futures::future::join_all(sends).await;

    let mut args = payment_handler::HandlerArgs::for_tests();
    args.group_commit_max = group_commit_max;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = payment_handler::start(kafka, &db_url, args, stop.clone())
        .await
        .expect("handler starts");
    let count = || async {
        let n: i64 = match &db {
            Db::Postgres(p) => sqlx::query_scalar("SELECT count(*) FROM handler_payments")
                .fetch_one(p)
                .await
                .unwrap(),
            Db::Sqlite(_) => unreachable!("PostgreSQL only"),
        };
        usize::try_from(n).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while count().await < messages {
        assert!(Instant::now() < deadline, "{label}: timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(count().await, messages, "one payment per message");
    let rate = messages as f64 / secs;
    println!(
        "inbound ({label:<18}): {messages} messages -> payments in {secs:.2} s = {rate:>8.0} payments/s (including the handler's start and the group join)"
    );
    stop.cancel();
    let _ = running.wait().await;
    rate
}

fn main() {
    let messages = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let brokers = testkit::brokers();
        let off = run("group commit off", &brokers, messages, 0).await;
        let on = run("group commit on", &brokers, messages, 256).await;
        println!("group commit on / off = {:.2}", on / off);
    });
}
