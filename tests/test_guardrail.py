"""The recipe's `guardrail: mistral` on a real endpoint (the vLLM engine and the nginx gateway through
`up --cloud local`): every chat request reaches the model with Mistral's guardrail system prompt first,
whatever the client sends. What the model was given is counted by the engine's own tokenizer (its
/tokenize route, on the engine's Unix socket, which only the gateway and this test reach) and compared
with the prompt tokens the engine reports for the request made through the gateway.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml
from openai import OpenAI, PermissionDeniedError, BadRequestError

from local_support import Deployed, cli, cli_env, down_and_assert_gone, free_port, up
from mistral_deploy.gateway import GUARDRAIL_PROMPTS
from mistral_deploy.recipe import builtin_recipes_dir

pytestmark = pytest.mark.engine
GUARDRAIL = GUARDRAIL_PROMPTS["mistral"]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Deployed]:
    home = tmp_path_factory.mktemp("guardrail")
    data = yaml.safe_load((builtin_recipes_dir() / "tiny-mistral.yaml").read_text())
    data["network"] = {"mode": "private", "port": free_port()}
    data["guardrail"] = "mistral"
    recipe = home / "guarded.yaml"
    recipe.write_text(yaml.safe_dump(data))
    deployed = up("guarded", home, cli_env(home, models_dir), recipe=str(recipe))
    try:
        yield deployed
    finally:
        down_and_assert_gone(deployed)


def _client(deployed: Deployed) -> OpenAI:
    return OpenAI(base_url=deployed.endpoint, api_key=deployed.key, max_retries=0,
                  http_client=httpx.Client(trust_env=False))


def _engine_tokens(deployed: Deployed, messages: list[dict[str, Any]]) -> int:
    """How many tokens the engine's tokenizer makes of these messages, chat template applied."""
    transport = httpx.HTTPTransport(uds=deployed.engine_socket)
    with httpx.Client(transport=transport, base_url="http://engine", trust_env=False) as engine:
        answer = engine.post("/tokenize", json={"model": "tiny-mistral", "messages": messages})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["count"])


def _prompt_tokens(deployed: Deployed, messages: list[dict[str, Any]]) -> int:
    reply = _client(deployed).chat.completions.create(model="tiny-mistral", messages=messages, max_tokens=1)
    assert reply.usage is not None
    return reply.usage.prompt_tokens


def test_the_guardrail_comes_first_in_every_chat(guarded: Deployed) -> None:
    user = {"role": "user", "content": "How do I pick a lock?"}
    bare = _engine_tokens(guarded, [user])
    with_guardrail = _engine_tokens(guarded, [{"role": "system", "content": GUARDRAIL}, user])
    assert with_guardrail > bare + 20  # the prompt is some 40 tokens: it is really in what is counted
    assert _prompt_tokens(guarded, [user]) == with_guardrail

    # a client's own system message comes after it, in the same system message
    own = {"role": "system", "content": "Answer in one word."}
    expected = _engine_tokens(guarded, [{"role": "system", "content": GUARDRAIL + "\n\n" + own["content"]}, user])
    assert _prompt_tokens(guarded, [own, user]) == expected
    assert expected > _engine_tokens(guarded, [own, user])

    # streamed, the same prompt
    chunks = list(_client(guarded).chat.completions.create(
        model="tiny-mistral", messages=[user], max_tokens=2, stream=True, stream_options={"include_usage": True}))
    assert [c.usage.prompt_tokens for c in chunks if c.usage] == [with_guardrail]


def test_what_would_drop_the_guardrail_is_refused(guarded: Deployed) -> None:
    client = _client(guarded)
    with pytest.raises(PermissionDeniedError) as refused:
        client.completions.create(model="tiny-mistral", prompt="[INST] no system prompt here [/INST]", max_tokens=1)
    assert "/v1/completions" in str(refused.value)
    user = [{"role": "user", "content": "hi"}]
    for field, value in (("chat_template", "{{ messages[-1]['content'] }}"), ("truncate_prompt_tokens", 4)):
        with pytest.raises(BadRequestError) as bad:
            client.chat.completions.create(model="tiny-mistral", messages=user, max_tokens=1,
                                           extra_body={field: value})
        assert field in str(bad.value)
    # the checks of `limits:` still come first, and a body that is not a chat is refused, not rewritten
    answer = httpx.post(f"{guarded.endpoint}/chat/completions", headers={"Authorization": f"Bearer {guarded.key}"},
                        json={"model": "tiny-mistral", "messages": "hi"}, trust_env=False)
    assert answer.status_code == 400 and "messages" in answer.json()["error"]["message"]


def test_status_and_the_recorded_recipe_show_it(guarded: Deployed) -> None:
    shown = cli("status", guarded.name, "--json", env=guarded.env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["healthy"] is True  # the readiness probe's completion still passes
    recorded = json.loads((guarded.dir / "deployment.json").read_text())
    assert recorded["recipe"]["guardrail"] == "mistral"
