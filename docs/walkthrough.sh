#!/usr/bin/env bash
# Review and release, end to end on the demo (README "Review and release"); run it as `make walkthrough`.
#
# Works on a copy of the project, notebook and store in $WALK (default /tmp/slipway-walkthrough), so your
# working tree, store and bentos are untouched. Two versions of the demo, the second with a prompt change:
# keys for three people, check, build, review (page with the diff and the regressed examples), signed
# approvals, deploy to prod, serve the prod channel, roll back while it serves, the signed audit log, and
# the ways around the gate that it refuses. 10 to 20 minutes after `make demo` (one new check of the 1.5B
# model on the 200-example eval set; the first check's run is reused from `make demo`'s store).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SLIPWAY="$REPO/.venv/bin/slipway"
WALK="${WALK:-/tmp/slipway-walkthrough}"
PORT="${PORT:-3077}"
# Print each command as you would type it (`slipway …`, arguments with spaces quoted), then run it.
step() {
    local shown="slipway" arg
    for arg in "$@"; do [[ "$arg" == *" "* ]] && shown+=" \"$arg\"" || shown+=" $arg"; done
    printf '\n$ %s\n' "$shown"
    "$SLIPWAY" "$@"
}

rm -rf "$WALK" && mkdir -p "$WALK/projects"
cp -r "$REPO/projects/ticket-triage" "$WALK/projects/"
cp -r "$REPO/notebooks" "$WALK/"
rm -rf "$WALK/notebooks/__marimo__" "$WALK/projects/ticket-triage/.slipway/reports"
cd "$WALK"
rm -f projects/ticket-triage/signers.toml projects/ticket-triage/audit-anchor.json
export BENTOML_HOME="$WALK/bentos"
echo "walk-through in $WALK (BENTOML_HOME=$BENTOML_HOME)"

echo; echo "== 0. Who may do what: each person's SSH public key in projects/ticket-triage/signers.toml (in git)"
# Everyone already holds a key (~/.ssh/id_ed25519, as for signing git commits); here we make three.
mkdir -p keys
for who in alice bob carol mallory; do ssh-keygen -q -t ed25519 -N "" -C "$who@example.com" -f "keys/$who"; done
# alice is the data scientist (checks and builds), bob reviews, carol ships and runs the service (so she also
# hands out the API keys its callers present: the `keys` role). One command per person:
step signers add ticket-triage alice --public-key keys/alice.pub
step signers add ticket-triage bob --public-key keys/bob.pub --roles approve
step signers add ticket-triage carol --public-key keys/carol.pub --roles deploy:prod,rollback:prod,audit,keys
step signers list ticket-triage
# An API key for the demo's customer, tenant acme in project.toml (shown once; only its sha256 is kept).
printf '\n$ slipway keys create ticket-triage --tenant acme --key keys/carol --json\n'
ACME_KEY=$("$SLIPWAY" keys create ticket-triage --tenant acme --key keys/carol --json \
           | python3 -c 'import json,sys; d = json.load(sys.stdin); print(d["key"])')
echo "(the key, sk-slipway-…, is kept in \$ACME_KEY for the requests below)"
step keys list ticket-triage
export SLIPWAY_SIGNING_KEY="$WALK/keys/alice"   # alice's terminal: what she runs, she signs

echo; echo "== 1. The current prompt: check, build, approve, deploy to prod"
step check ticket-triage
step build ticket-triage
V1=$("$SLIPWAY" build ticket-triage --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tag"])')
step deploy "$V1" --channel prod --key keys/carol || echo "(refused, as it should be: nobody approved $V1 yet)"
step approve "$V1" --note "I built it, I approve it" || echo "(refused: alice's key has no approve role)"
step approve "$V1" --key keys/bob --note "baseline reviewed"
step deploy "$V1" --channel prod --key keys/carol

echo; echo "== 2. A prompt change in the notebook: the old check is stale, a new one runs"
# The data scientist asks for fewer escalations: one sentence of the needs_human guidance changes.
OLD="needs_human: default false."
NEW="needs_human: default false; escalate only when a standard reply cannot resolve it."
python3 - "$OLD" "$NEW" <<'EOF'
import sys
from pathlib import Path
path = Path("notebooks/ticket_triage.py")
text = path.read_text()
assert sys.argv[1] in text, f"{sys.argv[1]!r} not in {path}"
path.write_text(text.replace(sys.argv[1], sys.argv[2], 1))
EOF
printf '\n(edit in notebooks/ticket_triage.py, the TicketTriage instructions)\n- %s\n+ %s\n' "$OLD" "$NEW"
step build ticket-triage || echo "(refused: the check is stale)"
step check ticket-triage
step build ticket-triage
V2=$("$SLIPWAY" build ticket-triage --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tag"])')

echo; echo "== 3. Review the new version against prod: contract, prompt diff, paired deltas, regressed examples"
step review "$V2" --against-channel prod

echo; echo "== 4. Approve and deploy it; serve the prod channel"
step approve "$V2" --key keys/bob --note "fewer escalations; regressions reviewed"
step deploy "$V2" --channel prod --key keys/carol
step status ticket-triage
"$SLIPWAY" serve ticket-triage --channel prod --port "$PORT" > "$WALK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
TICKET='{"ticket": "Since the update our whole team cannot log in, SSO loops forever."}'
ask() { "$REPO/.venv/bin/python" -c 'import sys, urllib.request as u
r = u.Request(sys.argv[1], data=sys.argv[2].encode(), headers={"content-type": "application/json",
                                                                "authorization": "Bearer " + sys.argv[3]})
print(u.urlopen(r, timeout=60).read().decode())' "http://127.0.0.1:$PORT/triage" "$TICKET" "$ACME_KEY" 2>/dev/null \
      || true; }
until "$REPO/.venv/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/readyz', timeout=2)" \
      2>/dev/null; do sleep 1; done
printf '\n$ curl -s -X POST 127.0.0.1:%s/triage -H "content-type: application/json" -H "Authorization: Bearer $ACME_KEY" -d %s\n%s\n' \
       "$PORT" "'$TICKET'" "$(ask)"

echo; echo "== 5. Roll prod back while it serves; the server follows without refusing a request"
step rollback ticket-triage --channel prod --key keys/carol
start=$(date +%s%N)
# Watch the server's log rather than hammering it: on 2 cores a busy live server slows the new one's start.
until grep -q "$V1 is live" "$WALK/serve.log"; do sleep 0.2; done
ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "$V1 took over $((ms / 1000)).$(( (ms % 1000) / 100 )) s after the rollback; the old version answered until then"
grep -E "moved from|is live" "$WALK/serve.log" | tail -2
printf '\n$ curl -s -X POST 127.0.0.1:%s/triage -H "content-type: application/json" -H "Authorization: Bearer $ACME_KEY" -d %s\n%s\n' \
       "$PORT" "'$TICKET'" "$(ask)"
step status ticket-triage

echo; echo "== 6. The audit log: every step signed, anchored in git, and an edit is named"
step audit list ticket-triage
step audit verify ticket-triage
step audit anchor ticket-triage --key keys/carol
kill $SERVER && wait $SERVER 2>/dev/null || true   # stop serving before touching the store file by hand

echo; echo "== 7. Walking around the gate, as mallory would"
step approve "$V2" --key keys/mallory --note "looks fine to me" || echo "(refused: her key is not in signers.toml)"
"$REPO/.venv/bin/python" -c "import duckdb, sys; c = duckdb.connect('projects/ticket-triage/.slipway/store.duckdb')
c.execute(\"INSERT INTO approvals (approval_id, project, version, content_hash, approver, note) VALUES \"
          \"('approval-forged', 'ticket-triage', ?, 'x', 'bob', 'typed into the store')\", [sys.argv[1]])
c.execute(\"INSERT INTO deployments (deploy_id, project, channel, version, action, actor) VALUES \"
          \"('deploy-forged', 'ticket-triage', 'prod', ?, 'deploy', 'carol')\", [sys.argv[1]])" "${V2#*:}"
echo "(mallory types an approval by bob and a deploy by carol into the store)"
step status ticket-triage
"$REPO/.venv/bin/python" -c "import duckdb; c = duckdb.connect('projects/ticket-triage/.slipway/store.duckdb')
c.execute(\"DELETE FROM deployments WHERE deploy_id = 'deploy-forged'\")
c.execute(\"UPDATE audit SET actor = 'mallory' WHERE action = 'approve'\")"
echo "(she takes her deploy row out again, and edits who approved in the audit log)"
step audit verify ticket-triage || echo "(exit $?: the edit is detected and the row named)"
BENTO_DIR="$BENTOML_HOME/bentos/ticket-triage/${V2#*:}"
sed -i 's/escalate only when/never escalate, even when/' "$BENTO_DIR/src/slipway/program.json"
echo "(she edits the prompt inside the approved bento: $BENTO_DIR/src/slipway/program.json)"
step deploy "$V2" --channel prod --key keys/carol || echo "(refused: the bento no longer matches its signed manifest)"
echo; echo "review page: $(ls "$WALK"/projects/ticket-triage/.slipway/reports/review-*.html)"
