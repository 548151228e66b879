//! Rough throughput of the simulator: `cargo run --release -p psp-sim
//! --example load -- [charges] [concurrency] [full|batched|relaxed]`.
//! Creates charges with distinct keys, then replays them all, against a
//! fresh SQLite file.

use std::sync::Arc;
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().map_or(Ok(2000), |a| a.parse())?;
    let concurrency: usize = args.next().map_or(Ok(16), |a| a.parse())?;
    let durability = match args.next().as_deref() {
        None | Some("full") => psp_sim::Durability::Full,
        Some("batched") => psp_sim::Durability::Batched,
        Some("relaxed") => psp_sim::Durability::Relaxed,
        Some(other) => anyhow::bail!("unknown durability {other:?}"),
    };
    assert!(total > 0 && concurrency > 0, "need positive numbers");
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("load.db").display());
    let sim = psp_sim::spawn(psp_sim::SimConfig {
        behaviour: psp_sim::Behaviour {
            durability,
            ..psp_sim::Behaviour::default()
        },
        ..psp_sim::SimConfig::for_tests(url)
    })
    .await?;
    let base = Arc::new(sim.base_url());
    let api_key = sim.api_key.clone();
    let http = reqwest::Client::new();
    for phase in ["create", "replay"] {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..concurrency {
            let (http, base, api_key) = (http.clone(), base.clone(), api_key.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = worker;
                while i < total {
                    let key = format!("ord_{i}");
                    let body = serde_json::json!({"amount_minor": 1000 + i, "currency": "EUR",
                        "card_token": "tok_visa", "reference": key});
                    let r = http
                        .post(format!("{base}/v1/charges"))
                        .bearer_auth(api_key.expose())
                        .header("Idempotency-Key", &key)
                        .json(&body)
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "{}", r.status());
                    i += concurrency;
                }
                Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let ms = started.elapsed().as_millis().max(1);
        println!(
            "{phase}: {total} requests, concurrency {concurrency}, {durability:?}: {ms} ms, {} req/s",
            u128::try_from(total)? * 1000 / ms
        );
    }
    if let Some(b) = sim.write_batches() {
        println!("{b:?}");
    }
    sim.stop().await
}
