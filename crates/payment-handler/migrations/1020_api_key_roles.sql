-- API key roles (issue 12): a key is either a client's ('client': it acts
-- for its client and reads only that client's data) or an operator's
-- ('operator': ledger-wide reads and verification on the projections'
-- query API). Existing keys stay client keys. Revocation sets revoked_ms
-- (`paystream clients revoke`); a revoked key authenticates nowhere.
ALTER TABLE handler_api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'client'
    CHECK (role IN ('client', 'operator'));
CREATE INDEX handler_api_keys_client ON handler_api_keys (client_id);
