"""Database schema: per component, an append-only list of migration scripts.

The version of each component is kept in ``schema_versions``; step N of a component runs once,
in its own transaction. A step never changes once released: add a new one. Every business table
that records a fact points at the seq of the outbox event that carries it.
"""

from __future__ import annotations

CORE: tuple[str, ...] = (
    # 1: the outbox, command replay cache, sales and inventory
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO meta(key, value) VALUES
        ('last_seq', 0), ('acked_through', 0), ('sent_through', 0), ('snapshot_as_of_seq', 0),
        ('snapshot_at', 0);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,        -- gapless, assigned at commit, never reused
        id TEXT NOT NULL,               -- UUIDv7, stable across retransmissions
        type TEXT NOT NULL,
        created_at REAL NOT NULL,       -- local wall clock at commit (for ages and retention)
        body TEXT NOT NULL              -- the envelope exactly as sent, every time
    );
    CREATE TABLE commands (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        received_at REAL NOT NULL,
        keep_until REAL NOT NULL,       -- replay cache horizon (expiry + skew + window)
        result TEXT NOT NULL            -- JSON of the first command.result data
    ) WITHOUT ROWID;
    CREATE TABLE sales (
        sale_id TEXT PRIMARY KEY,       -- sale_id or return_id (kind tells which)
        kind TEXT NOT NULL,
        terminal_id TEXT NOT NULL,
        seq INTEGER NOT NULL            -- seq of its sale.completed / return.completed event
    ) WITHOUT ROWID;
    CREATE TABLE stock_base (sku TEXT PRIMARY KEY, on_hand INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE movements (
        seq INTEGER PRIMARY KEY,        -- seq of its inventory.changed event
        sku TEXT NOT NULL,
        delta INTEGER NOT NULL,
        cause TEXT NOT NULL,
        ref TEXT NOT NULL
    );
    CREATE INDEX movements_sku ON movements(sku, seq);
    CREATE TABLE adjustments (adjustment_id TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE snapshot_parts (
        snapshot_id TEXT NOT NULL,
        part INTEGER NOT NULL,
        parts INTEGER NOT NULL,
        as_of_seq INTEGER NOT NULL,
        items TEXT NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (snapshot_id, part)
    ) WITHOUT ROWID;
    CREATE TABLE reservations (
        order_id TEXT NOT NULL,
        sku TEXT NOT NULL,
        qty INTEGER NOT NULL,
        PRIMARY KEY (order_id, sku)
    ) WITHOUT ROWID;
    CREATE INDEX reservations_sku ON reservations(sku);
    """,
)

# Component name → its steps, applied in this order (core first). Add a component with one line.
MIGRATIONS: dict[str, tuple[str, ...]] = {
    "core": CORE,
    # --- component migrations below (one entry per component) ---
    "payment_schedule": (  # 1: the local date of each terminal's last scheduled end-of-day
        "CREATE TABLE payment_end_of_day (device_id TEXT PRIMARY KEY, last_date TEXT NOT NULL,"
        " ran_at REAL NOT NULL) WITHOUT ROWID",
    ),
    "payments": (  # 1: card payments (gateway/payments.py), one row per request_id
        """
        CREATE TABLE payments (
            request_id TEXT PRIMARY KEY,
            till TEXT NOT NULL,             -- POS terminal the request came from
            device_id TEXT NOT NULL,        -- payment terminal it ran on
            kind TEXT NOT NULL,             -- purchase | reversal
            amount_minor INTEGER NOT NULL,
            currency TEXT NOT NULL,
            reversal_of TEXT,
            original_receipt_no INTEGER,
            state TEXT NOT NULL,            -- authorizing | confirming | approved | declined |
                                            -- aborted | failed | in_doubt
            receipt TEXT,                   -- kept part of its 04 0F (masked PAN only), JSON
            result TEXT,                    -- the final payment/result body, JSON
            recheck INTEGER NOT NULL DEFAULT 0,  -- in_doubt that asking the terminal may settle
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            seq INTEGER,                    -- seq of its payment.completed event
            resolved_seq INTEGER            -- seq of its payment.resolved event
        ) WITHOUT ROWID;
        CREATE INDEX payments_unsettled ON payments(state)
            WHERE state IN ('authorizing', 'confirming', 'in_doubt');
        CREATE INDEX payments_reversal_of ON payments(reversal_of) WHERE reversal_of IS NOT NULL;
        """,
    ),
    "inventory_sync": (
        "CREATE TABLE snapshots_applied (snapshot_id TEXT PRIMARY KEY, as_of_seq INTEGER NOT NULL,"
        " parts INTEGER NOT NULL, applied_at REAL NOT NULL) WITHOUT ROWID",
    ),
    "lockers": (
        # 1: click-and-collect orders, compartment occupancy, pulse audit, request replies, keypads
        """
        CREATE TABLE orders (
            order_id TEXT PRIMARY KEY,
            status TEXT NOT NULL,           -- accepted/in_locker/collected/expired/cancelled/rejected
            size TEXT NOT NULL,
            items TEXT NOT NULL,            -- JSON [[sku, qty], ...]
            pickup_by REAL NOT NULL,        -- POSIX time
            customer_ref TEXT,
            bank TEXT,
            compartment INTEGER,
            code_hash TEXT,                 -- scrypt hash while the code may be used, else NULL
            seq INTEGER NOT NULL            -- seq of its latest order.updated event
        ) WITHOUT ROWID;
        CREATE INDEX orders_status ON orders(status, pickup_by);
        CREATE TABLE compartments (
            bank TEXT NOT NULL,
            number INTEGER NOT NULL,
            state TEXT NOT NULL,            -- free/loading/occupied/retrieve/out_of_order
            order_id TEXT,
            PRIMARY KEY (bank, number)
        ) WITHOUT ROWID;
        CREATE TABLE locker_actions (
            action_id TEXT PRIMARY KEY,     -- one physical opening (1..jam_tries pulses)
            bank TEXT NOT NULL,
            compartment INTEGER NOT NULL,
            opened_by TEXT NOT NULL,
            ref TEXT NOT NULL,
            state TEXT NOT NULL,            -- pending until its outcome commits; done/failed/unknown
            seq INTEGER NOT NULL            -- seq of its first locker.opened event
        ) WITHOUT ROWID;
        CREATE INDEX locker_actions_pending ON locker_actions(state);
        CREATE TABLE locker_requests (
            bank TEXT NOT NULL,
            action TEXT NOT NULL,
            request_id TEXT NOT NULL,
            reply TEXT NOT NULL,            -- the first answer, repeated for a repeated id
            at REAL NOT NULL,
            PRIMARY KEY (bank, action, request_id)
        ) WITHOUT ROWID;
        CREATE TABLE locker_keypads (
            bank TEXT PRIMARY KEY,
            failures TEXT NOT NULL,         -- JSON list of wall times of recent wrong codes
            locked_until REAL NOT NULL
        ) WITHOUT ROWID;
        """,
    ),
}
