"""Checking that a checkpoint on disk is whole: what `alloy verify` runs.

Works on any Hugging Face safetensors checkpoint and checks more on our own outputs:
  - the index (when sharded): valid, every shard present and inside the directory, every tensor
    in the shard the index names, no tensor in two shards, ``total_size`` equal to the data;
  - every header: validated as for merge inputs, and the data covered without gaps or trailing
    bytes (what the reference safetensors loader demands);
  - shard hashes: size and BLAKE3 digest against ``modelalloy_manifest.json`` when the output has one;
  - the data: every floating-point tensor read back and checked for NaN/Inf (``read_data``);
  - given the merge config: every tensor the plan expects is present with its dtype and shape,
    and nothing else is.
Problems are collected, not raised, so that one run lists all of them; a path that is not a
checkpoint directory at all is a `CheckpointError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import MAX_JSON_BYTES, SAFETENSORS_INDEX
from modelalloy.io.files import is_regular, not_regular, open_regular, read_regular
from modelalloy.io.manifest import MANIFEST, Manifest, digest_shard
from modelalloy.io.safetensors_format import TensorLocation, layout_problem, read_header, read_tensor


@dataclass
class VerifyReport:
    path: Path
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    data_bytes: int = 0
    hashes_checked: int = 0  # shards whose digest matched a recorded one
    planned_checked: int = 0  # planned tensors found with the right dtype and shape
    has_manifest: bool = False  # shard digests were recorded, so the bytes could be checked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def notes(self) -> list[str]:
        """What was not checked, so that "ok" is not read as more than it is."""
        if self.has_manifest:
            return []
        return [
            f"no {MANIFEST} here, so the tensor bytes were not checked against recorded digests: a changed or flipped byte "
            "inside the data goes unseen (only the index, headers, layout and NaN/Inf were checked)"
        ]

    def summary(self) -> dict:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "files": self.files,
            "tensors": self.tensors,
            "data_bytes": self.data_bytes,
            "hashes_checked": self.hashes_checked,
            "planned_checked": self.planned_checked,
            "content_checked": self.has_manifest,
            "problems": self.problems,
            "notes": self.notes,
        }


def verify_checkpoint(path: str | Path, *, config: str | Path | None = None, read_data: bool = True, allow_pickle: bool = False) -> VerifyReport:
    """Re-read the checkpoint directory `path` and report everything wrong with it.

    Args:
        path: a Hugging Face model directory (a merge output or any safetensors checkpoint).
        config: the merge config that made it; then the planned tensors must all be there.
        read_data: read every tensor back (NaN/Inf check); hashes are checked either way.
        allow_pickle: passed on when planning `config` against its inputs.

    Example:
        >>> report = verify_checkpoint("./merged", config="merge.yaml")  # doctest: +SKIP
        >>> report.ok, report.problems  # doctest: +SKIP
    """
    root = Path(path)
    try:
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a directory; give the checkpoint directory (the one with config.json)")
    except OSError as e:
        raise CheckpointError(f"{root}: cannot open ({e.strerror or e})") from None
    report = VerifyReport(root)
    problems = report.problems
    _check_config_json(root, problems)
    files, weight_map = _weight_files(root, problems)
    report.files = files
    tensors: dict[str, TensorLocation] = {}
    for file in files:
        try:
            found, _ = read_header(str(root / file))
        except CheckpointError as e:
            problems.append(str(e))
            continue
        _check_coverage(root / file, found, problems)
        for name, loc in found.items():
            if name in tensors:
                problems.append(f"tensor {name!r} is in both {Path(tensors[name].file).name} and {file}")
            elif weight_map is not None and weight_map.get(name) != file:
                where = f"the index puts it in {weight_map[name]}" if name in weight_map else "the index does not list it"
                problems.append(f"{file}: holds tensor {name!r} but {where}")
            tensors[name] = loc
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors and file in files:
                problems.append(f"{SAFETENSORS_INDEX}: lists tensor {name!r} in {file}, whose header does not have it")
        total = _index_total_size(root)
        data = sum(t.nbytes for t in tensors.values())
        if isinstance(total, int) and total != data:
            problems.append(f"{SAFETENSORS_INDEX}: metadata.total_size is {total} but the shards hold {data} bytes of tensors")
    report.tensors = len(tensors)
    report.data_bytes = sum(t.nbytes for t in tensors.values())
    report.has_manifest = (root / MANIFEST).exists()
    report.hashes_checked = _check_manifest(root, files, problems)
    if read_data:
        _check_finite(tensors, problems)
    if config is not None:
        report.planned_checked = _check_planned(config, tensors, problems, allow_pickle)
    return report


def _check_config_json(root: Path, problems: list[str]) -> None:
    if not (root / "config.json").exists():
        problems.append(f"{root}: config.json is missing; transformers cannot load the model without it")
        return
    try:
        config = json.loads(read_regular(root / "config.json", limit=MAX_JSON_BYTES).decode("utf-8"))
    except CheckpointError as e:
        problems.append(str(e))
        return
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        problems.append(f"{root / 'config.json'}: unreadable ({e})")
        return
    if not isinstance(config, dict):
        problems.append(f"{root / 'config.json'}: not a JSON object")


def _weight_files(root: Path, problems: list[str]) -> tuple[list[str], dict[str, str] | None]:
    """Shard file names (relative to root) and the index's weight map, if there is an index."""
    index = root / SAFETENSORS_INDEX
    if not index.exists():
        files = sorted(p.name for p in root.glob("*.safetensors") if not p.name.startswith("adapter_"))
        if not files:
            problems.append(f"{root}: no *.safetensors weight files")
        return files, None
    try:
        weight_map = json.loads(read_regular(index, limit=MAX_JSON_BYTES).decode("utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError
    except CheckpointError as e:
        problems.append(str(e))
        return [], None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        problems.append(f"{index}: not a valid index (needs a 'weight_map' object of tensor -> file)")
        return sorted(p.name for p in root.glob("*.safetensors")), None
    files = []
    for file in sorted(set(weight_map.values())):
        target = (root / file).resolve()
        if not target.is_relative_to(root.resolve()):
            problems.append(f"{index}: shard name {file!r} points outside the model directory")
        elif not target.exists():
            problems.append(f"{index}: lists shard {file!r}, which is missing")
        elif not is_regular(target):
            problems.append(str(not_regular(target, target.stat().st_mode)))
        else:
            files.append(file)
    return files, weight_map


def _index_total_size(root: Path) -> object:
    try:
        return json.loads(read_regular(root / SAFETENSORS_INDEX, limit=MAX_JSON_BYTES)).get("metadata", {}).get("total_size")
    except (CheckpointError, ValueError, AttributeError, RecursionError):
        return None


def _check_coverage(file: Path, tensors: dict[str, TensorLocation], problems: list[str]) -> None:
    """The data buffer must be exactly the tensors, back to back (the reference loader refuses gaps)."""
    problem = layout_problem(str(file), tensors)
    if problem is not None:
        problems.append(problem)


def _check_manifest(root: Path, files: list[str], problems: list[str]) -> int:
    if not (root / MANIFEST).exists():
        return 0
    manifest = Manifest.load(root)
    if manifest is None:
        problems.append(f"{root / MANIFEST}: unreadable; cannot check shard hashes")
        return 0
    matched = 0
    for file in files:
        if file not in manifest.shards:
            problems.append(f"{file}: not recorded in {MANIFEST}; the output is incomplete or was changed")
    for file, record in sorted(manifest.shards.items()):
        path = root / file
        if not path.is_file():
            problems.append(f"{file}: recorded in {MANIFEST} but missing")
        elif path.stat().st_size != record.get("bytes"):
            problems.append(f"{file}: {path.stat().st_size} bytes, but {record.get('bytes')} were written")
        elif digest_shard(path) != record.get("blake3"):
            problems.append(f"{file}: BLAKE3 digest differs from the one recorded when it was written; the file was changed or damaged")
        else:
            matched += 1
    return matched


def _check_finite(tensors: dict[str, TensorLocation], problems: list[str]) -> None:
    by_file: dict[str, list[TensorLocation]] = {}
    for loc in tensors.values():
        by_file.setdefault(loc.file, []).append(loc)
    bad = []
    for file, locs in by_file.items():
        try:
            fd = open_regular(file)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        try:
            for loc in sorted(locs, key=lambda t: t.start):
                if loc.dtype.is_floating_point and not bool(torch.isfinite(read_tensor(fd, loc).float()).all()):
                    bad.append(loc.name)
        except CheckpointError as e:
            problems.append(str(e))
        finally:
            os.close(fd)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        problems.append(f"tensors holding NaN or Inf: {', '.join(sorted(bad)[:5])}{more}")


def _check_planned(config: str | Path, tensors: dict[str, TensorLocation], problems: list[str], allow_pickle: bool) -> int:
    from modelalloy.api import plan_merge
    from modelalloy.engine import MergeOptions

    plan, models = plan_merge(config, options=MergeOptions(allow_pickle=allow_pickle, copy_tokenizer=False))
    try:
        planned = {r.name: r for r in plan.recipes}
        found = 0
        for name, recipe in planned.items():
            loc = tensors.get(name)
            if loc is None:
                problems.append(f"tensor {name!r} is planned by {config} but missing from the output")
            elif loc.dtype != recipe.out_dtype or loc.shape != recipe.shape:
                problems.append(
                    f"tensor {name!r}: planned {str(recipe.out_dtype).removeprefix('torch.')} {list(recipe.shape)}, "
                    f"found {str(loc.dtype).removeprefix('torch.')} {list(loc.shape)}"
                )
            else:
                found += 1
        for name in sorted(set(tensors) - set(planned)):
            problems.append(f"tensor {name!r} is in the output but not in the plan of {config}")
        return found
    finally:
        for ckpt in models.values():
            ckpt.close()


__all__ = ["VerifyReport", "verify_checkpoint"]
