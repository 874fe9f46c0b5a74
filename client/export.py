"""A user owns their adapter: export it (peft files + manifest) and import it elsewhere, verified.

The export is a plain peft adapter directory (`PeftModel.from_pretrained` loads it on the same base) plus
`oppu-manifest.json`: base-model sha256, task-adapter sha256, task, PEFT config and the sha256 of every file.
Import refuses a tampered file or a base model other than the one the adapter was trained on.

    oppu-adapter export RUN_DIR USER OUT_DIR [--variant k0]
    oppu-adapter import EXPORT_DIR TARGET_DIR [--model NAME] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from client.adapters import TRAINING_RECORD, personal_adapter_name
from client.model_build import UnknownModelError, resolve_model
from client.model_cache import CACHE_DIR_HELP
from common.exit_status import BAD_INPUT, DONE
from common.methods import parse_variant
from common.model_files import file_sha256, model_hash
from common.store import (
    JsonFileError,
    UserStore,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    load_json_file,
    read_json,
)

MANIFEST = "oppu-manifest.json"


class AdapterImportError(ValueError):
    """An exported adapter that must not be used here."""


def export_adapter(run_dir: Path, user_id: str, out_dir: Path, variant: str = "k0") -> dict[str, Any]:
    """Copy one personal adapter out of the user's store with a manifest; returns the manifest."""
    store = UserStore(run_dir, user_id)
    if not store.root.is_dir():
        users = sorted(p.name for p in (Path(run_dir) / "clients").glob("*") if p.is_dir())
        raise FileNotFoundError(f"{run_dir}: no user {user_id!r} there (expected one of {len(users)} users in "
                                f"clients/: {', '.join(users[:10])}{', ...' if len(users) > 10 else ''})")
    source = store.adapter(personal_adapter_name(user_id, variant))
    record = read_json(source / TRAINING_RECORD)
    if record is None:
        prefix = personal_adapter_name(user_id) + "-"
        trained = sorted(p.parent.name.removeprefix(prefix) for p in source.parent.glob(f"*/{TRAINING_RECORD}"))
        raise FileNotFoundError(f"{source}: no trained adapter (expected {TRAINING_RECORD} beside peft's files); "
                                f"this user's trained variants: {', '.join(trained) or 'none'}")
    files = sorted(p.name for p in source.iterdir() if p.is_file() and p.name != TRAINING_RECORD)
    config = record.get("config", {})
    model = _shared_name(str(config.get("model", "")))
    peft_config = {**load_json_file(source / "adapter_config.json"), "base_model_name_or_path": model}
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; export into a new directory")
    with atomic_directory(out_dir) as staging:
        for name in files:
            shutil.copy2(source / name, staging / name)
        # peft wrote the base's local directory there; a shared adapter names the model instead
        atomic_write_text(staging / "adapter_config.json", json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        manifest = {
            **record,
            "config": {**config, **{key: _shared_name(str(config[key])) for key in ("model", "data") if key in config}},
            "user": user_id,
            "adapter": source.name,
            "peft_config": peft_config,
            "files": {name: file_sha256(staging / name) for name in files},
        }
        atomic_write_json(staging / MANIFEST, manifest)
    return manifest


def _shared_name(value: str) -> str:
    """A --model or --data value as an export shares it: the names of its files, never where they lay on the
    owner's machine ("/home/me/data/users.json" -> "users.json"; names such as "smollm2" stay)."""
    return ":".join(Path(part).name for part in value.split(":"))


def _read_manifest(export_dir: Path) -> dict[str, Any]:
    """The export's manifest, refused unless it has the shape `export_adapter` writes (plain file names only, so
    an import never copies from or to outside the two directories)."""
    path = export_dir / MANIFEST
    try:
        manifest = read_json(path)
    except JsonFileError as e:  # a directory, not UTF-8, not JSON
        raise AdapterImportError(f"{e}; the export is damaged") from None
    if manifest is None:
        raise AdapterImportError(f"{export_dir}: no {MANIFEST}; not an exported OPPU adapter")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (
        isinstance(files, dict)
        and all(isinstance(sha, str) and name not in ("", ".", "..") and Path(name).name == name
                for name, sha in files.items())
        and isinstance(manifest.get("base_model_sha256"), str)
    ):
        raise AdapterImportError(f"{path}: expected an object with 'files' (file name -> sha256) and "
                                 "'base_model_sha256'; the manifest is damaged")
    return manifest


def verify_export(export_dir: Path, base_model_dir: Path) -> dict[str, Any]:
    """The manifest, after checking every file's hash and that `base_model_dir` is the adapter's base."""
    manifest = _read_manifest(export_dir)
    for name, expected in manifest["files"].items():
        path = export_dir / name
        if not path.exists():
            raise AdapterImportError(f"{path}: listed in the manifest but missing")
        if file_sha256(path) != expected:
            raise AdapterImportError(f"{path}: sha256 does not match the manifest (file altered)")
    extra = sorted(p.name for p in export_dir.iterdir() if p.name not in manifest["files"] and p.name != MANIFEST)
    if extra:
        raise AdapterImportError(f"{export_dir}: files not in the manifest: {extra}")
    actual = model_hash(base_model_dir)
    if actual != manifest["base_model_sha256"]:
        raise AdapterImportError(
            f"base model mismatch: the adapter was trained on {manifest['base_model_sha256'][:12]}…, "
            f"this base ({base_model_dir}) is {actual[:12]}…"
        )
    return manifest


def import_adapter(export_dir: Path, target: Path, base_model_dir: Path) -> dict[str, Any]:
    """Verify an export and copy it (manifest included) to `target`."""
    manifest = verify_export(export_dir, base_model_dir)
    if target.exists():
        raise FileExistsError(f"{target} exists; import into a new directory")
    with atomic_directory(target) as staging:
        for name in [*manifest["files"], MANIFEST]:
            shutil.copy2(export_dir / name, staging / name)
    return manifest


def _variant(text: str) -> str:
    """--variant: a personal adapter's variant name (common/methods.py's grammar)."""
    try:
        parse_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oppu-adapter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="copy a user's personal adapter out of a run, with a manifest")
    export.add_argument("run_dir", type=Path, help="a run directory (flower-simulation's or oppu-deploy's)")
    export.add_argument("user", help="the user's id, as in RUN_DIR/clients/<user>/")
    export.add_argument("out_dir", type=Path, help="where the export goes (a new directory)")
    export.add_argument("--variant", type=_variant, default="k0",
                        help="which of the user's adapters: k0 (method oppu), k1 (oppu+rag-k1), k0-pag (oppu+pag), "
                        "... (default: k0)")
    imp = commands.add_parser("import", help="verify an exported adapter against a base model and copy it")
    imp.add_argument("export_dir", type=Path, help="a directory written by `oppu-adapter export`")
    imp.add_argument("target_dir", type=Path, help="where the verified copy goes (a new directory)")
    imp.add_argument("--model", default="smollm2",
                     help="the base model here (name, path or hub id; default: smollm2)")
    imp.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            manifest = export_adapter(args.run_dir, args.user, args.out_dir, args.variant)
            print(f"exported {manifest['adapter']} to {args.out_dir} ({len(manifest['files'])} files)")
        else:
            manifest = import_adapter(args.export_dir, args.target_dir, resolve_model(args.model, args.cache_dir))
            print(f"imported {manifest['adapter']} into {args.target_dir}: hashes and base model verified")
    except (AdapterImportError, UnknownModelError, FileNotFoundError, FileExistsError) as e:
        print(f"oppu-adapter: {e}", file=sys.stderr)
        return BAD_INPUT  # every error here is about the run, user, export or target the command was given
    return DONE


if __name__ == "__main__":
    sys.exit(main())
