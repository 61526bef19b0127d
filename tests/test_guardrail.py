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
from openai import OpenAI, PermissionDeniedError, BadRequestError

from local_support import Deployed, cli, cli_env, down_and_assert_gone, free_port, tiny_recipe, up
from mistral_deploy.gateway import GUARDRAIL_PROMPTS

pytestmark = pytest.mark.engine
GUARDRAIL = GUARDRAIL_PROMPTS["mistral"]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Deployed]:
    home = tmp_path_factory.mktemp("guardrail")
    recipe = tiny_recipe(home, "guarded", network={"mode": "private", "port": free_port()}, guardrail="mistral")
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


# Mistral's own tokenizers (--tokenizer-mode mistral: mistral_common's chat format, no template), each one
# mistral_common ships (v1 to v7 SentencePiece, Tekken): every order the gateway lets through keeps the system
# message (the guardrail) in the prompt. Run in the engine's Python, with the mistral_common vLLM uses.
_MISTRAL_FORMATS = r"""
import glob, json, os, sys
import mistral_common
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

guardrail = sys.argv[1]
call = ToolCall(id="abcdefghi", function=FunctionCall(name="f", arguments="{}"))
orders = {
    "user": [UserMessage(content="hello")],
    "ends-with-assistant": [UserMessage(content="hello"), AssistantMessage(content="Sure.", prefix=True)],
    "multi-turn": [UserMessage(content="hello"), AssistantMessage(content="Sure."), UserMessage(content="again")],
    "ends-with-tool-result": [UserMessage(content="hello"), AssistantMessage(tool_calls=[call]),
                              ToolMessage(content="42", tool_call_id="abcdefghi")],
}
found = {}
for path in sorted(glob.glob(os.path.join(os.path.dirname(mistral_common.__file__), "data", "*"))):
    tokenizer = MistralTokenizer.from_file(path)
    for name, turns in orders.items():
        request = ChatCompletionRequest(messages=[SystemMessage(content=guardrail), *turns])
        try:
            text = tokenizer.encode_chat_completion(request).text
        except Exception as exc:  # v1 has no tools
            found[f"{os.path.basename(path)} {name}"] = f"refused: {exc}"
            continue
        found[f"{os.path.basename(path)} {name}"] = guardrail in text.replace("\u2581", " ")
print(json.dumps(found))
"""


def test_every_mistral_tokenizer_keeps_the_guardrail_in_each_accepted_order() -> None:
    import subprocess

    from local_support import require_engine

    proc = subprocess.run([require_engine(), "-c", _MISTRAL_FORMATS, GUARDRAIL], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) >= 6 * 4  # v1, v2, v3, v7, tekken...: each with every order
    dropped = {case: kept for case, kept in found.items() if kept is not True and not (
        isinstance(kept, str) and "Tools not implemented" in kept)}
    assert dropped == {}


@pytest.mark.parametrize("recipe, template", [("tiny-mistral", True), ("mistral-7b-instruct-awq", True),
                                              ("mistral-7b-instruct-gptq", True), ("mistral-7b-instruct", False),
                                              ("mixtral-8x7b-instruct", False)])
def test_the_engine_gets_a_chat_template_that_keeps_the_guardrail_unless_mistral_tokenizes(
        recipe: str, template: bool) -> None:
    from mistral_deploy.recipe import Recipe, load_recipe
    from mistral_deploy.render import engine_args, guardrail_chat_template

    plain = load_recipe(recipe).recipe
    guarded = Recipe.model_validate({**plain.to_yaml_config(), "guardrail": "mistral"})
    args = engine_args(guarded, model="m", socket="/s")
    assert ("--chat-template" in args) is template
    if template:
        assert args[args.index("--chat-template") + 1] == guardrail_chat_template()
        assert "\n" not in guardrail_chat_template() and "{{- bos_token -}}" in guardrail_chat_template()
    assert "--chat-template" not in engine_args(plain, model="m", socket="/s")
