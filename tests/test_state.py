"""The state store under several CLI processes at once: names are reserved once, records stay whole."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

from mistral_deploy.state import Deployment, StateStore


def _reserve(args: tuple[str, str]) -> str:
    root, name = args
    from mistral_deploy.errors import DeploymentExists

    store = StateStore(Path(root))
    try:
        store.reserve(Deployment(name=name, backend="local", recipe={"name": name}))
    except DeploymentExists:
        return "exists"
    for i in range(20):  # concurrent saves of the same record must never leave it half-written
        deployment = store.load(name)
        deployment.details[f"k{os.getpid()}-{i}"] = i
        store.save(deployment)
    return "reserved"


def test_concurrent_processes_reserve_a_name_once_and_never_corrupt_records(tmp_path):
    jobs = [(str(tmp_path), "same")] * 8 + [(str(tmp_path), f"name-{i}") for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = pool.map(_reserve, jobs)
    assert results[:8].count("reserved") == 1 and results[:8].count("exists") == 7
    assert results[8:] == ["reserved"] * 8
    store = StateStore(tmp_path)
    assert sorted(d.name for d in store.list()) == sorted(["same"] + [f"name-{i}" for i in range(8)])
    for deployment in store.list():
        record = store.dir(deployment.name) / "deployment.json"
        json.loads(record.read_text())
        assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(store.dir(deployment.name)).st_mode) == 0o700


def test_api_keys_are_0600_and_not_in_the_record(tmp_path):
    store = StateStore(tmp_path)
    store.reserve(Deployment(name="d", backend="local", recipe={}))
    store.write_api_keys("d", ["md-secret-key-0123456789abcdef"])
    assert stat.S_IMODE(os.stat(store.dir("d") / "api_keys").st_mode) == 0o600
    assert "md-secret" not in (store.dir("d") / "deployment.json").read_text()
    assert store.read_api_keys("d") == ["md-secret-key-0123456789abcdef"]


def test_the_served_model_name_read_from_the_record_is_the_recipes():
    """Deployment.served_model_name (no validation) is what the validated recipe says: its model.served_name,
    or its name."""
    from mistral_deploy.recipe import Overrides, load_recipe

    for ref, overrides in (("tiny-mistral", Overrides(cloud="local")), ("mistral-7b", Overrides(name="other")),
                           ("mistral-7b", Overrides(model="mistralai/Mistral-7B-v0.3"))):
        recipe = load_recipe(ref, overrides).recipe
        deployment = Deployment(name=recipe.name, backend="local", recipe=recipe.to_yaml_config())
        assert deployment.served_model_name == deployment.recipe_model().served_model_name == recipe.served_model_name
