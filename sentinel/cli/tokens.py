"""``sentinel token``: credentials for sentinel's API and the replicas' model API."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from sentinel.cli.base import app

token_app = typer.Typer(help="Credentials for sentinel's API and the replicas' model API.", no_args_is_help=True)
app.add_typer(token_app, name="token")
SCOPES = ("read", "operate", "infer")


@token_app.command("issue")
def token_issue(
    scope: Annotated[list[str], typer.Option(help="read, operate (sentinel's API) or infer (the model API); "
                                                  "repeatable")],
    subject: Annotated[str, typer.Option(help="who the token is for (its 'sub'; rate limits count per subject)")],
    ttl: Annotated[str, typer.Option(help="lifetime (the seed: 15m)")] = "15m",
    audience: Annotated[str | None, typer.Option(help="its 'aud' (default: api.jwt_audience)")] = None,
    secret_env: Annotated[str | None, typer.Option(help="sign with the secret in this environment variable "
                                                        "(default: api.jwt_secret from the settings)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="settings YAML file")] = None,
) -> None:
    """Print an HS256 token (JWT) for the given scopes, valid for --ttl."""

    from inference_core.security import issue_token
    from sentinel.durations import parse_duration
    from sentinel.settings import load_settings

    bad = [x for x in scope if x not in SCOPES]
    if bad:
        raise typer.BadParameter(f"unknown scope(s) {', '.join(bad)}; known: {', '.join(SCOPES)}", param_hint="--scope")
    s = load_settings(config)
    secret = os.environ.get(secret_env) if secret_env else (
        s.api.jwt_secret.get_secret_value() if s.api.jwt_secret else None)
    if not secret:
        typer.echo("error: no signing secret: set api.jwt_secret (SENTINEL_API__JWT_SECRET) or --secret-env", err=True)
        raise typer.Exit(2)
    seconds = parse_duration(ttl)
    if not 0 < seconds <= 86400:
        raise typer.BadParameter("between 1s and 24h", param_hint="--ttl")
    typer.echo(issue_token(secret, subject, scope, seconds, audience or s.api.jwt_audience, s.api.jwt_issuer))


@token_app.command("hash")
def token_hash(
    key: Annotated[str, typer.Option(prompt=True, hide_input=True, help="the API key (prompted; never echoed)")],
) -> None:
    """Print an API key's SHA-256, for api.api_key_hashes or the model API's --api-key-hash."""
    from inference_core.security import hash_key

    if len(key) < 16:
        raise typer.BadParameter("use 16 or more random characters", param_hint="--key")
    typer.echo(hash_key(key))
