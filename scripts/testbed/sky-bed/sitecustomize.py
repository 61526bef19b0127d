"""The test bed's one change to SkyPilot, for the bed's client environment alone (a stand-in, not product).

`scripts/testbed.sh client-env DIR` puts this folder on PYTHONPATH, so Python runs this file at start in
the bed client's processes only: its CLI calls, SkyPilot's API server and what that starts (SkyServe's
controller and load balancer in consolidation mode). mistral-deploy never ships or imports it, and
nothing here changes what SkyPilot sends to a real cloud.

What it stands in for: a cloud firewall. SkyPilot 0.14.1 refuses `resources.ports` on Slurm
(CloudImplementationFeatures.OPEN_PORTS) and has no endpoint query for it, because a Slurm node's ports
are whatever the site's network allows. The bed's nodes are network namespaces on one link with this
machine, so every port of a node is reachable: here Slurm may "open" ports (a no-op, as
sky/provision/slurm/instance.py's open_ports already is) and a port's endpoint is the node's address
(NodeAddr, which SkyPilot reads for the job's node), as a cloud's opened port is the VM's address.

And for an offline machine: SkyPilot checks that "the network" is up by sending HEAD requests to 8.8.8.8
and 1.1.1.1 before it refreshes a service's status (backend_utils.check_network_connection). The bed's
cloud is this machine, and nothing of the bed may reach past it: here that check passes without a packet.

The change is made when SkyPilot's own modules are first imported (an import hook), so a process that
never imports SkyPilot pays nothing.
"""

import importlib.abc
import importlib.machinery
import sys


def _slurm_cloud(module):
    from sky import clouds

    module.Slurm._CLOUD_UNSUPPORTED_FEATURES.pop(clouds.CloudImplementationFeatures.OPEN_PORTS, None)


def _slurm_provision(module):
    def query_ports(cluster_name_on_cloud, ports, head_ip=None, provider_config=None):
        from sky.provision import common
        from sky.provision.slurm import instance
        from sky.utils import resources_utils

        del head_ip  # on Slurm: the login node's address, not the node's
        info = instance.get_cluster_info(None, cluster_name_on_cloud, provider_config)
        head = info.get_head_instance()
        if head is None or not head.internal_ip:
            return {}
        return {port: [common.SocketEndpoint(port=port, host=head.internal_ip)]
                for port in resources_utils.port_ranges_to_set(ports)}

    module.query_ports = query_ports


def _backend_utils(module):
    def check_network_connection():
        return None  # the bed's cloud is this machine

    module.check_network_connection = check_network_connection


_PATCHES = {"sky.clouds.slurm": _slurm_cloud, "sky.provision.slurm": _slurm_provision,
            "sky.backends.backend_utils": _backend_utils}


class _BedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _BedFinder())
