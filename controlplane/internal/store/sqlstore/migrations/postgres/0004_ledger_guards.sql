-- The ledger is append-only and a credit hold is resolved once, by the
-- database itself: no code path updates or deletes an entry, a redemption
-- or a resolved hold, and none may start to. (PostgreSQL's form of
-- migrations/sqlite/0004_ledger_guards.sql; TRUNCATE is refused too.)
CREATE FUNCTION copelf_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    FOR EACH ROW EXECUTE FUNCTION copelf_refuse('ledger entries are append-only');
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION copelf_refuse('ledger entries are append-only');
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION copelf_refuse('ledger entries are append-only');

-- pending → captured | voided, once; nothing else of a hold changes.
CREATE TRIGGER credit_holds_resolve_once BEFORE UPDATE ON credit_holds
    FOR EACH ROW
    WHEN (OLD.status <> 'pending' OR NEW.status NOT IN ('captured', 'voided')
        OR NEW.id <> OLD.id OR NEW.account_id <> OLD.account_id OR NEW.run_id <> OLD.run_id OR NEW.amount <> OLD.amount)
    EXECUTE FUNCTION copelf_refuse('a credit hold moves from pending to captured or voided, once');
CREATE TRIGGER credit_holds_no_delete BEFORE DELETE ON credit_holds
    FOR EACH ROW EXECUTE FUNCTION copelf_refuse('credit holds are kept');
CREATE TRIGGER credit_holds_no_truncate BEFORE TRUNCATE ON credit_holds
    FOR EACH STATEMENT EXECUTE FUNCTION copelf_refuse('credit holds are kept');

CREATE TRIGGER coupon_redemptions_no_update BEFORE UPDATE ON coupon_redemptions
    FOR EACH ROW EXECUTE FUNCTION copelf_refuse('coupon redemptions are append-only');
CREATE TRIGGER coupon_redemptions_no_delete BEFORE DELETE ON coupon_redemptions
    FOR EACH ROW EXECUTE FUNCTION copelf_refuse('coupon redemptions are append-only');
CREATE TRIGGER coupon_redemptions_no_truncate BEFORE TRUNCATE ON coupon_redemptions
    FOR EACH STATEMENT EXECUTE FUNCTION copelf_refuse('coupon redemptions are append-only');
