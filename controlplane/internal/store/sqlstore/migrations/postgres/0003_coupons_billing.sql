-- Coupons and billing (API.md §8). Every exactly-once rule is a constraint:
-- one redemption per (coupon, account) is UNIQUE; the cap is a guarded
-- increment checked by a CHECK; a purchase's grant is the ledger's unique
-- idem_key "stripe:checkout:<sessionId>"; an account has one Stripe customer.
CREATE TABLE coupons (
    id              TEXT COLLATE "C" PRIMARY KEY,
    code            TEXT COLLATE "C" NOT NULL UNIQUE,
    credits         BIGINT NOT NULL,
    max_redemptions BIGINT,
    redeemed        BIGINT NOT NULL DEFAULT 0,
    starts_at       BIGINT,
    expires_at      BIGINT,
    active          BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    CHECK (credits > 0),
    CHECK (max_redemptions IS NULL OR max_redemptions > 0),
    CHECK (redeemed >= 0 AND (max_redemptions IS NULL OR redeemed <= max_redemptions))
);
CREATE INDEX coupons_created ON coupons (created_at, id);

CREATE TABLE coupon_redemptions (
    id         TEXT COLLATE "C" PRIMARY KEY,
    coupon_id  TEXT COLLATE "C" NOT NULL REFERENCES coupons (id),
    account_id TEXT COLLATE "C" NOT NULL,
    ledger_id  TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (coupon_id, account_id)
);

-- One account per Stripe customer (the column exists since version 1).
CREATE UNIQUE INDEX accounts_stripe_customer ON accounts (stripe_customer_id) WHERE stripe_customer_id IS NOT NULL;

-- Stripe Checkout Sessions that buy credit packs: pending → paid | failed,
-- failed → paid; paid is final.
CREATE TABLE checkout_sessions (
    id         TEXT COLLATE "C" PRIMARY KEY,
    account_id TEXT COLLATE "C" NOT NULL,
    price_id   TEXT COLLATE "C" NOT NULL,
    credits    BIGINT NOT NULL,
    status     TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CHECK (credits > 0),
    CHECK (status IN ('pending', 'paid', 'failed'))
);
CREATE INDEX checkout_sessions_account ON checkout_sessions (account_id, created_at);
