"""Download what the engine loads of a Hub model into the Hugging Face cache, then exit.

Usage: python download_model.py REPO REVISION WEIGHTS_PATTERN   (REVISION may be empty: the default branch)

Runs on the VM, in the vLLM image, in a short-lived container that alone receives a gated model's HF_TOKEN:
the engine then starts offline (HF_HUB_OFFLINE=1) without it. Its last line names the exact commit fetched,
which `up` records and pins for every later start of the deployment. Fetches the configs, the tokenizer files and one
weights format (WEIGHTS_PATTERN, e.g. consolidated*.safetensors for `--load-format mistral`, or whatever
format the repository has if it lacks that one), never both formats of a repository that ships two.
"""

import fnmatch
import os
import sys

from huggingface_hub import HfApi, snapshot_download

CONFIGS = ["*.json", "*.model", "*.model.v*", "*.txt", "*.tiktoken", "*.jinja"]
FALLBACK_WEIGHTS = ["*.safetensors", "*.bin", "*.pt"]


def main(repo: str, revision: str, weights: str) -> None:
    revision = revision or None
    info = HfApi().model_info(repo, revision=revision)
    files = [s.rfilename for s in info.siblings or []]
    chosen = next((p for p in [weights, *FALLBACK_WEIGHTS] if any(fnmatch.fnmatch(f, p) for f in files)), weights)
    # the cache records which commit the revision (or the default branch) resolved to: the engine, offline,
    # loads that commit
    path = snapshot_download(repo, revision=revision, allow_patterns=CONFIGS + [chosen])
    # the snapshot's folder is named after the commit it holds (what the branch resolved to at download)
    print(f"mistral-deploy: downloaded {repo} at {os.path.basename(path)} ({chosen}) to {path}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
