"""Triggers that keep CampaignCount in step with every change of a message's status.

Statement-level triggers with transition tables: a claim of 50 rows or a cancel of a
million adds one small upsert per (campaign, status), not one per row. All rows of one
statement go to one randomly chosen shard, in status order, so concurrent statements
never lock counter rows in opposite orders (no deadlocks).

Messages are never deleted one by one (only with their campaign, whose counts go with
it), so there is no DELETE trigger: it would recreate the counts of a campaign being
deleted.
"""

from django.db import migrations

SHARDS = 8

FORWARD = f"""
CREATE OR REPLACE FUNCTION mailroom_apply_counts(deltas jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE pick smallint := floor(random() * {SHARDS});
BEGIN
    INSERT INTO email_service_campaigncount (campaign_id, status, shard, count)
    SELECT (d->>'campaign_id')::uuid, d->>'status', pick, (d->>'delta')::bigint
      FROM jsonb_array_elements(deltas) AS d
     ORDER BY d->>'campaign_id', d->>'status'
    ON CONFLICT (campaign_id, status, shard)
    DO UPDATE SET count = email_service_campaigncount.count + EXCLUDED.count;
END $$;

CREATE OR REPLACE FUNCTION mailroom_count_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE deltas jsonb;
BEGIN
    SELECT jsonb_agg(jsonb_build_object('campaign_id', campaign_id, 'status', status,
                                        'delta', n))
      INTO deltas
      FROM (SELECT campaign_id, status, count(*) AS n FROM new_rows
             WHERE campaign_id IS NOT NULL GROUP BY campaign_id, status) g;
    IF deltas IS NOT NULL THEN PERFORM mailroom_apply_counts(deltas); END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION mailroom_count_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE deltas jsonb;
BEGIN
    SELECT jsonb_agg(jsonb_build_object('campaign_id', campaign_id, 'status', status,
                                        'delta', n))
      INTO deltas
      FROM (SELECT campaign_id, status, sum(delta) AS n FROM (
                SELECT o.campaign_id, o.status, -1 AS delta
                  FROM old_rows o JOIN new_rows nw ON nw.id = o.id
                 WHERE o.campaign_id IS NOT NULL AND o.status IS DISTINCT FROM nw.status
                UNION ALL
                SELECT nw.campaign_id, nw.status, 1
                  FROM old_rows o JOIN new_rows nw ON nw.id = o.id
                 WHERE nw.campaign_id IS NOT NULL AND o.status IS DISTINCT FROM nw.status
            ) changes GROUP BY campaign_id, status HAVING sum(delta) <> 0) g;
    IF deltas IS NOT NULL THEN PERFORM mailroom_apply_counts(deltas); END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER mailroom_count_insert AFTER INSERT ON email_service_message
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION mailroom_count_insert();
CREATE TRIGGER mailroom_count_update AFTER UPDATE ON email_service_message
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION mailroom_count_update();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS mailroom_count_insert ON email_service_message;
DROP TRIGGER IF EXISTS mailroom_count_update ON email_service_message;
DROP FUNCTION IF EXISTS mailroom_count_insert();
DROP FUNCTION IF EXISTS mailroom_count_update();
DROP FUNCTION IF EXISTS mailroom_apply_counts(jsonb);
"""


class Migration(migrations.Migration):
    dependencies = [("email_service", "0002_campaigns")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
