"""Why an engine did not come up, read from the last lines of its log: one line a user can act on.

The local backend and the cloud VMs run the same engine, so they fail the same ways; the VM's run script
also ends its job with a line of its own (`mistral-deploy: failed: ...`) when a container stops.
"""

from __future__ import annotations

import re
from typing import Optional

# (pattern in the log, what it means and what to do); the first that matches wins, most specific first.
_KNOWN: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"GatedRepoError|gated repo|Access to model .{0,200} is restricted|401 Client Error|"
                r"Invalid (user )?token|401 Unauthorized", re.IGNORECASE),
     "the Hugging Face Hub refused the model download (401: a gated model needs HF_TOKEN, from an account "
     "that accepted the model's terms on huggingface.co); set HF_TOKEN and run `up` again"),
    (re.compile(r"RepositoryNotFoundError|Repository Not Found|404 Client Error", re.IGNORECASE),
     "the Hugging Face Hub has no such model, or the token cannot see it (404): check model.id (--model)"),
    (re.compile(r"(CUDA )?out of memory|OutOfMemoryError|No available memory for the cache blocks|"
                r"larger than the available KV cache memory", re.IGNORECASE),
     "the model does not fit in the GPUs' memory: pick larger GPUs (--gpu), lower model.max_model_len, "
     "or a quantized model"),
    (re.compile(r"(could not|cannot) (connect|resolve)|Name or service not known|Temporary failure in name "
                r"resolution|Network is unreachable|ConnectTimeout", re.IGNORECASE),
     "the engine could not reach the network to download the model: the VM needs outbound access to "
     "huggingface.co (or a NAT gateway in vpc mode)"),
)
_OWN_LINE = re.compile(r"mistral-deploy: failed: (.*)$")


def explain(log_tail: str) -> Optional[str]:
    """The reason for a failed start, from the log's last lines, or None when none is recognised."""
    lines = [line for line in log_tail.splitlines() if line.strip()]
    text = "\n".join(lines)
    for pattern, meaning in _KNOWN:
        if pattern.search(text):
            return meaning
    for line in reversed(lines):
        match = _OWN_LINE.search(line)
        if match:
            return match.group(1).strip()
    return None
