#!/usr/bin/env bash
# One command from a fresh clone to a real local endpoint: installs what is needed, brings up the tiny
# Mistral-architecture model behind the gateway, and sends it a chat request with the official client.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"

# `up` converges: it creates the endpoint, leaves a healthy one from an earlier run as it is, and starts
# again whatever of it stopped
mistral-deploy up tiny-mistral --cloud local
eval "$(mistral-deploy env tiny-mistral)"

echo
echo "# a query through the gateway (OPENAI_BASE_URL=$OPENAI_BASE_URL):"
python - <<'PY'
from openai import OpenAI

client = OpenAI()  # reads OPENAI_BASE_URL and OPENAI_API_KEY
reply = client.chat.completions.create(
    model="tiny-mistral", messages=[{"role": "user", "content": "Hello!"}], max_tokens=16
)
print("model:", reply.model)
print("reply:", repr(reply.choices[0].message.content), "(random weights: gibberish is expected)")
PY
echo
echo "# the same with curl:"
echo "curl -s \$OPENAI_BASE_URL/models -H \"Authorization: Bearer \$OPENAI_API_KEY\""
echo "# stop it with: .venv/bin/mistral-deploy down tiny-mistral"
