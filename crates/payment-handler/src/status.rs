//! The payment-status projection as a consumer of the payments topic. The
//! POST path applies its own events at once (read-your-writes); this
//! consumer applies everything, including the executor's outcomes. Both go
//! through `store::apply_status`, deduplicated by event id, so the table is
//! the same however the events arrive, and rebuildable from the topic.

use storage::Db;
use streaming::{BatchHandler, Delivered, HandlerError, Outcome};

#[derive(Debug)]
pub struct StatusProjection {
    db: Db,
}

impl StatusProjection {
    pub fn new(db: Db) -> StatusProjection {
        StatusProjection { db }
    }
}

impl BatchHandler for StatusProjection {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        let envs: Vec<_> = batch.iter().map(|d| &d.envelope).collect();
        crate::store::apply_status(&self.db, &envs)
            .await
            .map_err(|e| {
                HandlerError::classified(
                    storage::deterministic_kind(&e),
                    format!("payment-status projection: {e}"),
                )
            })
    }
}
