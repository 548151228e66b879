-- A rejected event keeps its applied_events row together with the decision,
-- so a redelivery returns the stored rejection (and is dead-lettered again,
-- harmlessly) instead of being decided afresh against newer state.
ALTER TABLE applied_events ADD COLUMN outcome TEXT NOT NULL DEFAULT 'applied'
    CHECK (outcome IN ('applied', 'rejected'));
ALTER TABLE applied_events ADD COLUMN error_kind TEXT;
ALTER TABLE applied_events ADD COLUMN reason TEXT;
