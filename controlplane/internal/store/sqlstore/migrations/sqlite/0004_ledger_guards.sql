-- The ledger is append-only and a credit hold is resolved once, by the
-- database itself: no code path updates or deletes an entry, a redemption
-- or a resolved hold, and none may start to.
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'ledger entries are append-only');
END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'ledger entries are append-only');
END;

-- pending → captured | voided, once; nothing else of a hold changes.
CREATE TRIGGER credit_holds_resolve_once BEFORE UPDATE ON credit_holds
WHEN OLD.status <> 'pending' OR NEW.status NOT IN ('captured', 'voided')
    OR NEW.id <> OLD.id OR NEW.account_id <> OLD.account_id OR NEW.run_id <> OLD.run_id OR NEW.amount <> OLD.amount
BEGIN
    SELECT RAISE(ABORT, 'a credit hold moves from pending to captured or voided, once');
END;
CREATE TRIGGER credit_holds_no_delete BEFORE DELETE ON credit_holds
BEGIN
    SELECT RAISE(ABORT, 'credit holds are kept');
END;

CREATE TRIGGER coupon_redemptions_no_update BEFORE UPDATE ON coupon_redemptions
BEGIN
    SELECT RAISE(ABORT, 'coupon redemptions are append-only');
END;
CREATE TRIGGER coupon_redemptions_no_delete BEFORE DELETE ON coupon_redemptions
BEGIN
    SELECT RAISE(ABORT, 'coupon redemptions are append-only');
END;
