"""What SkyPilot's infrastructures can do for a recipe, asked before anything is launched.

Two levels:
- names, without importing SkyPilot (recipe validation, `render`): SKYPILOT_CLOUDS is SkyPilot 0.14.1's
  own list (tests/test_skypilot_validation.py checks it against sky.utils.registry.CLOUD_REGISTRY);
- what a recipe needs of each cloud it names, asked of SkyPilot's own code through skysdk, in-process and
  without its API server (called by `up` before the deployment is recorded): the features (opened ports,
  spot, autodown) and the GPUs its catalog offers; and, from SkyPilot's config module (sky.skypilot_config,
  read as SkyPilot reads it), the Azure identity an az:// bucket needs.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from typing import TYPE_CHECKING

from mistral_deploy.errors import CloudError, RecipeError

if TYPE_CHECKING:
    from mistral_deploy.recipe import Recipe
    from mistral_deploy.skysdk import SkySdk

# sky.utils.registry.CLOUD_REGISTRY in SkyPilot 0.14.1, and its aliases.
SKYPILOT_CLOUDS = (
    "aws", "azure", "cudo", "do", "fluidstack", "gcp", "hyperbolic", "ibm", "kubernetes", "lambda", "mithril",
    "nebius", "oci", "paperspace", "primeintellect", "runpod", "scp", "seeweb", "shadeform", "slurm", "ssh",
    "vast", "verda", "vsphere", "yotta",
)
CLOUD_ALIASES = {"digitalocean": "do", "k8s": "kubernetes"}


def canonical_cloud(name: str) -> str:
    """A SkyPilot infrastructure name (aliases resolved); ValueError with a suggestion for an unknown one."""
    name = CLOUD_ALIASES.get(name, name)
    if name in SKYPILOT_CLOUDS:
        return name
    close = difflib.get_close_matches(name, SKYPILOT_CLOUDS + ("local",), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown infrastructure {name!r}; {hint}expected local or one of SkyPilot's: "
                     + ", ".join(SKYPILOT_CLOUDS))


def check_launchable(recipe: "Recipe", sdk: "SkySdk") -> None:
    """Refuse, in one line and before anything exists, what no cloud the recipe names can do: open the
    gateway's port (public and vpc modes), spot instances, tearing itself down (TTL); and an az:// bucket
    with no identity to read it."""
    check_bucket_identity(recipe)
    clouds = recipe.resources.clouds
    if not clouds:
        return  # any enabled cloud: SkyPilot's optimizer chooses
    needs: dict[str, str] = {}
    if recipe.network.mode in ("public", "vpc"):
        needs["open_ports"] = (f"network.mode: {recipe.network.mode} needs the gateway port opened, which "
                               "SkyPilot cannot do on {cloud} ({reason}); use --network private and reach "
                               "the endpoint with `mistral-deploy tunnel`")
    if recipe.resources.spot:
        needs["spot_instance"] = "resources.spot: {cloud} has no spot instances ({reason}); use --on-demand"
    if recipe.lifetime.ttl:
        needs["autodown"] = ("lifetime.ttl: {cloud} cannot tear a cluster down by itself ({reason}); "
                             "remove the TTL (--ttl none) and run `mistral-deploy down`")
    if not needs:
        return
    refusals: list[str] = []
    for cloud in clouds:
        missing = sdk.unsupported_features(cloud, list(needs))
        if not missing:
            return  # this cloud can do all of it
        feature, reason = next(iter(missing.items()))
        refusals.append(needs[feature].format(cloud=cloud, reason=reason))
    raise RecipeError(refusals[0] if len(refusals) == 1 else "no cloud of the recipe can serve it: "
                      + "; ".join(refusals))


def check_gpus_offered(recipe: "Recipe", sdk: "SkySdk") -> None:
    """At least one GPU candidate is offered by one of the recipe's clouds (SkyPilot's catalog), or say
    which GPUs each cloud does offer. A cloud whose catalog cannot be read here is not judged."""
    clouds, gpus = recipe.resources.clouds, recipe.resources.gpu
    if not clouds or not gpus:
        return
    offers: dict[str, dict[str, list[int]]] = {}
    for cloud in clouds:
        found = sdk.offered_gpus(cloud)
        if found is None:
            return  # cannot tell for this cloud: SkyPilot's launch decides
        if any(g.count in found.get(g.name, ()) for g in gpus):
            return
        offers[cloud] = found
    wanted = ", ".join(str(g) for g in gpus)
    parts = []
    for cloud, found in offers.items():
        listed = ", ".join(f"{name}:{'/'.join(str(c) for c in counts)}" for name, counts in sorted(found.items()))
        parts.append(f"{cloud} offers {listed or 'no GPU in its catalog'}")
    raise CloudError(f"resources.gpu: {' and '.join(clouds)} offer{'s' if len(clouds) == 1 else ''} none of "
                     f"{wanted}; {'; '.join(parts)}; pick one with --gpu")


# SkyPilot's values of azure.remote_identity that name no identity of the user's (schemas.RemoteIdentityOptions):
# with any of them an Azure VM gets SkyPilot's own managed identity, made per cluster with Contributor on the
# cluster's resource group (sky/provision/azure/azure-config-template.json), which cannot read a blob.
_NO_AZURE_IDENTITY = ("LOCAL_CREDENTIALS", "SERVICE_ACCOUNT", "NO_UPLOAD")
AZURE_IDENTITY_SETTING = ("azure: {remote_identity: /subscriptions/SUB/resourceGroups/RG/providers/"
                          "Microsoft.ManagedIdentity/userAssignedIdentities/NAME}")


def check_bucket_identity(recipe: "Recipe") -> None:
    """An az:// source is read by the engine as the Azure VM's managed identity (the Run:ai streamer's
    DefaultAzureCredential; an account key or SAS token would be a secret in engine.env, which recipes
    refuse). SkyPilot gives the VM the identity `azure.remote_identity` names in its config, else one of
    its own that cannot read blobs: refuse that before anything is launched. The config is read as
    SkyPilot reads it for the cluster (its config files, workspace, the recipe's global config)."""
    source = recipe.model.source
    if not source or not source.startswith("az://"):
        return
    clouds = recipe.resources.clouds
    if clouds and "azure" not in clouds:
        raise CloudError(f"model.source: {source} is read with an Azure VM's managed identity, and "
                         f"{', '.join(clouds)} {'is' if len(clouds) == 1 else 'are'} not Azure; "
                         "add azure to resources.cloud (--cloud azure)")
    from sky import skypilot_config

    from mistral_deploy.render import cloud_config

    cluster = f"md-{recipe.name}"  # cloud.resource_name: the name SkyPilot matches a per-cluster list against
    global_config = cloud_config(recipe)
    with (skypilot_config.override_skypilot_config(global_config) if global_config else contextlib.nullcontext()):
        setting = skypilot_config.get_effective_workspace_region_config(
            cloud="azure", region=recipe.resources.region_for("azure"), keys=("remote_identity",),
            default_value=None)
    if isinstance(setting, list):  # [{cluster-name pattern: identity}, ...]: the first that matches
        setting = next((value for entry in setting for pattern, value in entry.items()
                        if fnmatch.fnmatchcase(cluster, pattern)), None)
    if isinstance(setting, str) and setting and setting not in _NO_AZURE_IDENTITY:
        return
    said = f"is {setting}" if setting else "is not set"
    raise CloudError(f"model.source: {source} needs an Azure managed identity that can read the storage "
                     f"account (Storage Blob Data Reader), and SkyPilot's azure.remote_identity {said} (its own "
                     f"identity cannot read blobs); set in ~/.sky/config.yaml: {AZURE_IDENTITY_SETTING}")
