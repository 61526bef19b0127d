"""Importing this package registers every command on the app."""

from mistral_deploy.cli.commands import plan, recipes, render, schema, validate  # noqa: F401
from mistral_deploy.cli.commands import tunnel  # noqa: F401,E402
from mistral_deploy.cli.commands import down, engine, env, exit_codes, logs, run, status, up  # noqa: F401,E402
from mistral_deploy.cli.commands import doctor, init  # noqa: F401,E402
from mistral_deploy.cli.commands import bench  # noqa: F401,E402
from mistral_deploy.cli.commands import keys, ttl  # noqa: F401,E402
from mistral_deploy.cli.commands import cache  # noqa: F401,E402
