"""The output directory of a merge: checked before anything is read (exists, overlaps an input,
fits on disk), laid out in shards with a fingerprint of everything that decides its bytes, opened
as `OUT.partial/` with an interrupted run's finished shards, and finished (config, tokenizer,
model card, fsync, rename into place)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from modelalloy.engine.options import MergeOptions, resolve_device
from modelalloy.errors import OutputError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.manifest import Manifest, fsync_dir, open_partial
from modelalloy.engine.model_card import write_model_card
from modelalloy.io.output import write_tokenizer_files
from modelalloy.io.writer import OutputTensor, ShardedWriter, layout_shards, parse_size, shard_names, write_text_durably
from modelalloy.plan import Plan, TensorRecipe
from modelalloy.version import __version__


@dataclass
class OutputJob:
    """An output being written: where, its fixed shard layout, and the shards already finished."""

    out_dir: Path
    partial: Path
    specs: list[OutputTensor]
    metadata: dict[str, str]
    max_shard_size: int
    device: torch.device
    manifest: Manifest | None  # None in a Ray worker's copy: only the driver records finished shards
    files: list[str]  # every shard file, in layout order
    shard_of: dict[str, str]  # output tensor -> its shard file
    reused: frozenset[str]  # shards an interrupted run finished (verified by their digests)

    def writer(self, *, finished: Collection[str], on_shard_done: Callable[[str, int, str], None] | None = None) -> ShardedWriter:
        """A writer for this layout that leaves the shards in `finished` alone (done, or someone else's)."""
        return ShardedWriter(self.partial, self.specs, max_shard_size=self.max_shard_size, metadata=self.metadata, finished=finished, on_shard_done=on_shard_done)

    def recipes_by_shard(self, plan: Plan) -> dict[str, list[TensorRecipe]]:
        grouped: dict[str, list[TensorRecipe]] = {f: [] for f in self.files}
        for r in plan.recipes:
            grouped[self.shard_of[r.name]].append(r)
        return grouped


def prepare_output(plan: Plan, checkpoints: Mapping[str, Checkpoint], out_dir: Path, options: MergeOptions) -> OutputJob:
    """Check the output, lay out its shards and open OUT.partial with an interrupted run's finished shards."""
    device = resolve_device(options.device)
    check_output(out_dir, checkpoints, plan.output_bytes, force=options.force)
    specs = [OutputTensor(r.name, r.out_dtype, r.shape) for r in plan.recipes]
    metadata = {"modelalloy_method": plan.method.name}
    max_shard_size = parse_size(options.max_shard_size)
    layout = layout_shards(specs, max_shard_size)
    files = shard_names(len(layout))
    partial = out_dir.with_name(out_dir.name + ".partial")
    fingerprint = plan_fingerprint(plan, checkpoints, layout, metadata, device)
    # One GGUF file has no finished shards to resume from: it is always written afresh.
    manifest = open_partial(partial, fingerprint, resume=options.resume and options.out_format == "safetensors")
    shard_of = {t.name: file for file, shard in zip(files, layout) for t in shard}
    return OutputJob(out_dir, partial, specs, metadata, max_shard_size, device, manifest, files, shard_of, frozenset(manifest.shards))


def finish_output(job: OutputJob, plan: Plan, checkpoints: Mapping[str, Checkpoint], options: MergeOptions, input_hashes: dict[str, str]) -> None:
    """Every shard is written (and the index): add config, support files and card, then rename into place."""
    partial, out_dir = job.partial, job.out_dir
    write_text_durably(partial / "config.json", json.dumps(plan.output_config, indent=2, sort_keys=True) + "\n")
    if options.copy_tokenizer:
        tokenizer = plan.vocab.tokenizer if plan.vocab is not None else None
        write_tokenizer_files(checkpoints[plan.donor], partial, tokenizer=tokenizer, chat_template=plan.chat_template)
    if plan.vocab is not None:
        write_text_durably(partial / "vocab_report.json", json.dumps(plan.vocab.report, indent=2, ensure_ascii=False) + "\n")
    if options.write_model_card:
        write_model_card(partial, plan, checkpoints, input_hashes)
    fsync_dir(partial)
    if out_dir.exists():  # only reachable with --force (checked in check_output)
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    fsync_dir(out_dir.parent)


def plan_fingerprint(plan: Plan, checkpoints: Mapping[str, Checkpoint], layout: list[list[OutputTensor]], metadata: dict, device: torch.device) -> str:
    """SHA-256 of everything that decides the output bytes: recipes, shard layout, the input files
    (path, size, mtime), code version and device. Finished shards are reused only on a match."""
    h = hashlib.sha256()

    def put(*items: object) -> None:
        h.update(repr(items).encode() + b"\n")

    put(__version__, device.type, str(plan.input_dtype), str(plan.compute_dtype), sorted(metadata.items()))
    for r in plan.recipes:
        put(r.name, r.method, [(s.model, s.tensor) for s in r.sources()], r.base is not None, sorted(r.params.items()), r.shape, str(r.out_dtype), r.seed)
    for shard in layout:
        put([t.name for t in shard])
    if plan.vocab is not None:  # which row of which model fills each output row
        put(plan.vocab.fingerprint())
    for ref in sorted({s.model for r in plan.recipes for s in r.sources()}):
        for file in checkpoints[ref].weight_files:
            st = os.stat(file)
            put(ref, file, st.st_size, st.st_mtime_ns)
    return h.hexdigest()


def check_output(out_dir: Path, checkpoints: Mapping[str, Checkpoint], out_bytes: int, *, force: bool) -> None:
    """Refuse an output that exists (without `force`), overlaps an input, or does not fit on disk.

    `alloy plan CONFIG OUT` runs this too, so these surface before any input is read."""
    resolved = out_dir.resolve()
    for ckpt in checkpoints.values():
        model_dir = ckpt.path.resolve()
        if resolved == model_dir or resolved.is_relative_to(model_dir) or model_dir.is_relative_to(resolved):
            raise OutputError(f"{out_dir}: the output overlaps the input model {ckpt.ref}; choose another directory")
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir}: already exists; pass --force to replace it, or choose another directory")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    partial = out_dir.with_name(out_dir.name + ".partial")
    # An interrupted run's shards are kept or overwritten in place: their allocated blocks (not their
    # size: unwritten regions of a laid-out shard are holes) count as available.
    reusable = sum(f.stat().st_blocks * 512 for f in partial.iterdir() if f.is_file()) if partial.is_dir() else 0
    if out_bytes > free + reusable:
        raise OutputError(
            f"{out_dir}: the merge writes {out_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free there; "
            "free some space or choose another disk"
        )


def fresh_partial(out_dir: Path, checkpoints: Mapping[str, Checkpoint], out_bytes: int, *, force: bool) -> Path:
    """Check the output location and create an empty `OUT.partial/`, for writers that do not resume (`alloy moe`)."""
    check_output(out_dir, checkpoints, out_bytes, force=force)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial
