"""``keygen``, ``sign``, ``deploy``, ``rollback``, ``deployments``, ``package``: ship an artifact."""

from __future__ import annotations

from pathlib import Path

import click

from edgepipe.cli import main
from edgepipe.cli._common import (
    _emit_json,
    _guard,
    _progress,
)


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Private key file to write (its public key: OUT.pub).")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
@_guard
def keygen(out: Path, force: bool) -> None:
    """Make a signing key pair (ECDSA P-256, PEM). Keep OUT private; copy OUT.pub to the devices."""
    from edgepipe.package.signing import keygen as make_keys

    pair = make_keys(out, force=force)
    click.echo(f"private key: {pair.private}\npublic key:  {pair.public} (id {pair.key_id[:16]})")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(path_type=Path), help="Private key (PEM) from `edgepipe keygen`.")
@click.option("--json", "as_json", is_flag=True)
@_guard
def sign(artifact: Path, key: Path, as_json: bool) -> None:
    """Sign an artifact (writes ARTIFACT/model.sig, OpenSSF model-signing format) after checking its hashes."""
    from edgepipe.package.signing import sign_artifact

    s = sign_artifact(artifact, key)
    if as_json:
        _emit_json({"artifact": str(s.artifact), "signature": str(s.signature), "key_id": s.key_id, "files": s.files})
        return
    click.echo(f"{artifact}: signed {s.files} files with key {s.key_id[:16]} ({s.signature})")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("board")
@click.option("--name", help="Deployment name on the board (default: the artifact folder's name).")
@click.option("--max-tokens", type=click.IntRange(2), default=64, show_default=True, help="Reference tokens the health check scores.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Top-1 agreement with the build host the board must reach.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@_guard
def deploy(artifact: Path, board: str, name: str | None, max_tokens: int, min_agreement: float, as_json: bool) -> None:
    """Copy ARTIFACT to BOARD (ssh://user@host[:port]) as a new version, health-check it there, then switch to it."""
    from edgepipe.devices.deploy import HealthCheck
    from edgepipe.devices.deploy import deploy as do_deploy

    res = do_deploy(artifact, board, name=name, health=HealthCheck(max_tokens=max_tokens, min_agreement=min_agreement),
                    progress=_progress(True))  # fmt: skip
    if as_json:
        _emit_json(res.to_dict())
        return
    click.echo(f"{res.name}: {res.version} is current on {res.board} (previous: {res.previous or 'none'}; {res.signature})")
    click.echo(f"  path on the board: {res.path}")


@main.command()
@click.argument("board")
@click.option("--name", required=True, help="Deployment name on the board.")
@click.option("--to", "to", help="Version to switch to (default: the one before the current one).")
@click.option("--json", "as_json", is_flag=True)
@_guard
def rollback(board: str, name: str, to: str | None, as_json: bool) -> None:
    """Switch a deployment on BOARD back to an earlier version (its files are still there)."""
    import dataclasses

    from edgepipe.devices.deploy import rollback as do_rollback

    res = do_rollback(board, name=name, to=to)
    if as_json:
        _emit_json(dataclasses.asdict(res))
        return
    click.echo(f"{res.name}: {res.current} is current on {res.board} (was {res.previous})")


@main.command()
@click.argument("board")
@click.option("--name", help="Only this deployment.")
@click.option("--json", "as_json", is_flag=True)
@_guard
def deployments(board: str, name: str | None, as_json: bool) -> None:
    """List the deployments on BOARD, their versions and which one is current."""
    from edgepipe.devices.deploy import deployments as list_deployments

    deps = list_deployments(board, name=name)
    if as_json:
        _emit_json({"board": board, "deployments": deps})
        return
    if not deps:
        click.echo(f"no deployments on {board}")
    for d in deps:
        click.echo(f"{d['name']} ({d['root']})")
        for v in d["versions"]:
            mark = "*" if v["version"] == d["current"] else " "
            click.echo(f"  {mark} {v['version']}  {v['kind'] or '?'}  {v['target'] or '?'}  {v['created'] or '?'}  {'signed' if v['signed'] else 'unsigned'}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--oci", "oci_out", required=True, type=click.Path(path_type=Path), help="OCI image layout folder to write (a path ending in .tar: an archive).")
@click.option("--platform", default="linux/arm64", show_default=True, type=click.Choice(["linux/arm64", "linux/amd64"]), help="Root filesystem, wheels.")
@click.option("--model-only", is_flag=True, help="The artifact alone as an OCI artifact (CNCF ModelPack), no root filesystem.")
@click.option("--tag", default="latest", show_default=True, help="Reference name in index.json (skopeo's oci:DIR:TAG).")
@click.option("--json", "as_json", is_flag=True)
@_guard
def package(artifact: Path, oci_out: Path, platform: str, model_only: bool, tag: str, as_json: bool) -> None:
    """Write a verified artifact as an OCI image (Debian Python root + runtime + artifact), no daemon needed."""
    from edgepipe.package.oci import package_oci

    res = package_oci(artifact, oci_out, platform=platform, model_only=model_only, tag=tag, progress=_progress(True))
    if as_json:
        _emit_json(res.to_dict())
        return
    kind = "model-only OCI artifact" if model_only else f"OCI image ({platform})"
    click.echo(f"{res.out}: {kind}, {res.bytes / 2**20:.1f} MB, manifest {res.manifest_digest}")


