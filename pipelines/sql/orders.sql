-- The read model kept by order-read-model.toml: one row per order, the latest event's values.
-- `version` counts the events applied to the row (exactly once each, so it equals the number
-- of events of the order). keyflow creates its own `keyflow_applied` table when it connects.
CREATE TABLE IF NOT EXISTS orders (
  order_id   TEXT PRIMARY KEY,
  status     TEXT NOT NULL,
  total      NUMERIC(12, 2) NOT NULL CHECK (total >= 0),
  updated_at TIMESTAMPTZ NOT NULL,
  version    INT NOT NULL
);
