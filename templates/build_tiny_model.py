"""Build a tiny random-weight model of the Mistral architecture, to try mistral-deploy without a GPU.

Usage: python build_tiny_model.py OUTDIR

Writes a Hugging Face model directory (config.json, model.safetensors in bfloat16, a byte-level BPE
tokenizer trained here on the small corpus below, and a Mistral-style [INST] ... [/INST] chat template)
that vLLM loads from the local path. About 1 MB; no download. The output is deterministic (fixed seeds).
The model is built in a temporary sibling directory and renamed to OUTDIR at the end, so a half-built
model never appears there. Imports only torch, transformers, tokenizers and the standard library: it runs
both in the local engine venv and inside the vllm/vllm-openai image.
"""

import os
import shutil
import signal
import sys
import tempfile

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (  # Mistral-style; a leading system message is prepended to the first user message
    "{% set system = '' %}{% set msgs = messages %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set msgs = messages[1:] %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in msgs %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
Mistral is a cold north wind that blows through the Rhone valley toward the Mediterranean sea.
A language model reads a sequence of tokens and predicts the next token, one step at a time.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Please write a short poem about the ocean, the mountains, and the stars above the quiet village.
The server listens on a local port; the gateway checks every request before it reaches the engine.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024 and 2048 appear in text.
def add(a, b):\n    return a + b\nprint(add(2, 3))
{"role": "user", "content": "Summarise this paragraph in one sentence."}
Questions, answers, instructions and replies: the assistant follows the user's instructions carefully.
Every morning the baker opens the shop, lights the oven, and bakes fresh bread for the neighbourhood.
Rivers flow into lakes, lakes into seas, and the water returns to the clouds as rain over the hills.
Small tests run quickly; large models need accelerators, memory, and patience to load and serve.
"""


def corpus():
    """The lines above, then counting from 0 to 999: enough distinct words for 1024 tokens."""
    return CORPUS.splitlines() + [" ".join(str(n) for n in range(i, i + 20)) for i in range(0, 1000, 20)]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    # Like Mistral's tokenizer: <s> before every encoded text (chat templates add it themselves).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model():
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    config = MistralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # vLLM's CPU attention: head_dim >= 32
        sliding_window=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config).to(torch.bfloat16).eval()


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        sys.exit("usage: python build_tiny_model.py OUTDIR")
    outdir = os.path.abspath(argv[1])
    if os.path.exists(outdir) and (not os.path.isdir(outdir) or os.listdir(outdir)):
        sys.exit(f"build_tiny_model: {outdir} already exists and is not an empty directory")
    parent = os.path.dirname(outdir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(outdir)}.tmp-", dir=parent)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up below on `docker stop` / kill too
    try:
        build_tokenizer().save_pretrained(tmp)
        build_model().save_pretrained(tmp, safe_serialization=True)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, outdir)  # atomic; also replaces an empty directory
        except OSError:
            # another build finished first (the nodes of a cluster may share this folder): the same seed,
            # the same model
            if not os.path.isfile(os.path.join(outdir, "config.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"built tiny Mistral-architecture model in {outdir}")


if __name__ == "__main__":
    main(sys.argv)
