"""The training recipe: setup, one step, the loop, cleanup. Reads top to bottom.

Runs on one CPU, one GPU, or several processes under `accelerate launch` (DDP). Every rank builds
the same deterministic batch plan for an epoch and takes its own share; a checkpoint records the
epoch and the number of micro-batches done, so a resumed run continues with exactly the batches,
weights, optimizer state and random state the interrupted one would have used.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from eardrum.adapters.audio import SAMPLING_RATE
from eardrum.adapters.checkpoint import build_audio_llm, load_pretrained, read_checkpoint_meta
from eardrum.adapters.config import AudioLLMConfig
from eardrum.common.batching import plan_batches, shard_batches
from eardrum.common.records import (
    DEFAULT_PROMPTS,
    DataError,
    DataProblem,
    DataSource,
    Record,
    RecordChecker,
    load_records,
    mix_indices,
    write_problems,
)

from .collate import Collator, model_inputs
from .compiling import compile_decoder_layers, uncompiled
from .distill import teacher_kl
from .evaluate import evaluate
from .lora import apply_encoder_lora, apply_llm_lora, freeze_for_training, parameter_report
from .recipe import DistillSettings, Recipe, save_recipe, streams
from .setup import (
    MetricsLog,
    build_optimizer,
    cache_root,
    make_cache,
    prepare_transcriber,
    resolve_precision,
    sequence_lengths,
    set_schedule_length,
    trim_jsonl,
)
from .state import (
    OutputDirError,
    RunLock,
    clear_earlier_run,
    clear_stale_temporaries,
    earlier_run,
    save_final,
)
from .stream import StreamedEpochs, StreamSettings
from .trackers import TENSORBOARD_DIR, Trackers, tracker_names

if TYPE_CHECKING:
    from accelerate import Accelerator

    from eardrum.adapters.model import AudioLLM

    from .cache import FeatureCache

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message names the step and the batch."""


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_done: int = 0  # micro-batches of `epoch` done by this rank
    examples: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class StepContext:
    """What every optimizer step uses, built once before the loop."""

    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    core: AudioLLM  # the same model, unwrapped
    optimizer: torch.optim.Optimizer
    scheduler_fn: Callable[[int], float]  # optimizer steps done -> learning rate
    collate: Collator
    cache: FeatureCache | None  # None: the encoder runs in every step
    acc: Accelerator
    recipe: Recipe
    skipped: BadExamples  # examples found bad while batching (data.skip_bad): logged and listed once


def _accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    precision = resolve_precision(recipe.train.mixed_precision)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        # accelerate keeps one precision per process; a later run in the same process (a notebook,
        # the demo's stages) may ask for another. Processes and devices stay; only that state goes.
        AcceleratorState._reset_state()
    logger.info("mixed precision: %s", precision)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise TrainingError(
            "the accelerate config asks for FSDP, but there is no GPU: accelerate runs FSDP only on GPU processes "
            "(on CPU ones it refuses fsdp_sync_module_states and, without it, falls back to DDP with the whole "
            "model in every process); for CPU processes use configs/accelerate/ddp.yaml"
        )
    trackers = tracker_names(recipe.train.report_to, recipe.train.tensorboard)
    project = ProjectConfiguration(project_dir=recipe.output_dir,
                                   logging_dir=str(Path(recipe.output_dir) / TENSORBOARD_DIR))
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), log_with=trackers or None,
                       project_config=project)


def _build_model(recipe: Recipe, device: torch.device):
    """The model to train, with a quantized LLM placed on this process's `device` as it loads."""
    t = recipe.train
    if t.init_from:
        meta = read_checkpoint_meta(t.init_from)
        if AudioLLMConfig.from_dict(meta["config"]).to_dict() != recipe.model.to_dict():  # defaults filled in
            raise ValueError(
                f"train.init_from: the model section differs from the config saved in {t.init_from}; "
                "copy that config into the recipe's model section"
            )
        model, processor = load_pretrained(t.init_from, quantization=t.quantization, device=device)
        if hasattr(model.llm, "peft_config"):
            model.llm = model.llm.merge_and_unload() if not t.quantization else model.llm
    else:
        model, processor = build_audio_llm(recipe.model, quantization=t.quantization, device=device)
    if recipe.lora.encoder:
        if model.transcriber is not None:
            raise ValueError("lora.encoder and model.transcript_hint: Whisper's decoder reads the same encoder, so "
                             "an encoder LoRA would change its transcripts as it trains; turn one of them off")
        apply_encoder_lora(model, recipe.lora)
    if recipe.lora.enabled:
        apply_llm_lora(
            model, recipe.lora, quantized=bool(t.quantization), gradient_checkpointing=t.gradient_checkpointing
        )
    if t.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.enable_input_require_grads()
    freeze_for_training(model)
    if t.compile:
        compile_decoder_layers(model.llm)
    return model, processor


def _load_data(recipe: Recipe, out: Path, main: bool):
    """Check every source up front: stop with the full list of problems, or skip and record them.
    Streamed training sources are only opened here; their rows are checked as they are read."""
    d = recipe.data
    found = {}
    for split, specs in (("train", d.train), ("eval", d.eval)):
        sources = [DataSource.from_dict(s) for s in specs]
        if split == "train" and streams(specs):
            found[split] = ([], sources)
            continue
        records, problems = load_records(
            sources, max_audio_seconds=recipe.model.max_audio_seconds, label_mode=recipe.model.label_mode
        )
        if problems and not d.skip_bad:
            raise DataError(problems)
        if problems and main:
            write_problems(problems, out / f"bad_examples_{split}.jsonl")
            logger.warning(
                "%s: skipped %d bad examples (listed in %s)", split, len(problems), out / f"bad_examples_{split}.jsonl"
            )
        found[split] = (records, sources)
    if not found["train"][0] and not streams(d.train):
        raise DataError([], message="no usable training example")
    return found


def train(recipe: Recipe) -> dict:
    """Run a recipe; returns a summary (final losses, paths, counts).

    The main process holds a lock on `output_dir` for the whole run (`state.RunLock`). A fresh run (no
    `train.resume_from`) into a folder that holds an earlier run's outputs is refused unless
    `train.overwrite=true`, which clears them first.
    """
    acc = _accelerator(recipe)
    t = recipe.train
    trackers = Trackers(acc, tracker_names(t.report_to, t.tensorboard), Path(recipe.output_dir), t.tracker_project)
    with RunLock(recipe.output_dir) if acc.is_main_process else contextlib.nullcontext():
        try:
            return _train(recipe, acc, trackers)
        except BaseException:
            trackers.end()  # a run that failed still closes its trackers' runs
            raise


def _train(recipe: Recipe, acc, trackers: Trackers) -> dict:
    from accelerate.utils import set_seed

    main = acc.is_main_process
    out = Path(recipe.output_dir)
    t, o, d = recipe.train, recipe.optim, recipe.data
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(out)
        _check_earlier_run(out, t)
        save_recipe(recipe, out / "recipe.yaml")
    data = _load_data(recipe, out, main)
    train_records, train_sources = data["train"]
    eval_records, _ = data["eval"]
    set_seed(t.seed)
    model, processor = _build_model(recipe, acc.device)
    if main:
        logger.info(parameter_report(model))
    cache = make_cache(recipe, model) if recipe.cache.enabled else None
    prepare_transcriber(model.transcriber, cache_root(recipe) if recipe.cache.enabled else None, t.mixed_precision)
    prompts = d.prompts or DEFAULT_PROMPTS
    optimizer, scheduler_fn = build_optimizer(model, recipe)
    model, optimizer = acc.prepare(model, optimizer)
    core = acc.unwrap_model(model)
    if main:
        logger.info("%s, %d process(es), %s; the model runs as %s", acc.distributed_type, acc.num_processes,
                    acc.device, type(model).__name__)
    skipped = BadExamples(out / "bad_examples_train.jsonl", main)
    if cache is not None:  # before the plan: a clip that cannot be read there is named, and skipped or fatal
        bad = _fill_cache(core, processor, cache, train_records + eval_records, prompts, t.seed, acc)
        if bad and not d.skip_bad:
            raise DataError(bad, message=f"{len(bad)} example(s) could not be read in full (data.skip_bad=true "
                                         "skips and lists them):")
        if bad:
            skipped.record(bad)
            gone = {p.where for p in bad}
            train_records = [r for r in train_records if r.where not in gone]
            eval_records = [r for r in eval_records if r.where not in gone]
            if not train_records:
                raise DataError(bad, message="no usable training example")
    collate = Collator(
        processor,
        train_records,
        prompts,
        t.seed,
        featurize=cache is None,
        skip_bad=d.skip_bad,
        teacher=recipe.distill.kl_weight > 0,
        ctc_blank=_ctc_blank(processor) if t.ctc_weight > 0 else None,
        pack=d.packing,
    )
    streamed = None
    if streams(d.train):
        streamed = StreamedEpochs(
            train_sources, RecordChecker(recipe.model.max_audio_seconds, recipe.model.label_mode),
            lambda records: sequence_lengths(records, processor),
            StreamSettings(d.batch_size, d.max_tokens, d.group_by_length, t.seed, d.shuffle_buffer, d.group_buffer,
                           d.packing),
            acc.num_processes, acc.process_index, skip_bad=d.skip_bad, on_bad=skipped.record,
        )
    lengths = sequence_lengths(train_records, processor) if train_records else []
    weights = {s.label: s.weight for s in train_sources}
    progress = Progress()
    resume = _maybe_resume(recipe, core, optimizer, progress, acc)
    metrics = MetricsLog(out, main, trackers, keep_until=progress.step if resume else None)
    trackers.start(recipe.to_dict(), resumed=resume is not None)
    if t.log_examples:
        trim_jsonl(out / f"examples-rank{acc.process_index}.jsonl", progress.step if resume else None)

    def epoch_plan(epoch: int) -> list[list[int]]:
        order = mix_indices(train_records, weights, t.seed, epoch)
        batches = plan_batches(
            lengths,
            order,
            batch_size=d.batch_size,
            max_tokens=d.max_tokens,
            seed=t.seed,
            epoch=epoch,
            group_by_length=d.group_by_length,
            packed=d.packing,
        )
        return shard_batches(batches, acc.num_processes, acc.process_index)

    if streamed is None:
        steps_per_epoch = math.ceil(len(epoch_plan(0)) / o.grad_accum)
        total_steps = min(t.max_steps or 10**12, steps_per_epoch * (t.epochs or 1))
    else:  # a stream's length is unknown: the recipe check asked for max_steps
        total_steps = t.max_steps

    def epoch_groups(epoch: int) -> Iterator[tuple[list[Record], list[list[int]]]]:
        """(records, micro-batches of indices into them) per optimizer step, from the step `progress` is at."""
        done = progress.micro_done // o.grad_accum
        if streamed is None:
            plan = epoch_plan(epoch)
            for i in range(done * o.grad_accum, len(plan), o.grad_accum):
                yield train_records, plan[i : i + o.grad_accum]
            return
        batches = streamed.batches(epoch)
        groups = iter(lambda: list(itertools.islice(batches, o.grad_accum)), [])
        for group in itertools.islice(groups, done, None):  # a resumed epoch skips what it trained, undecoded
            records = [r for batch in group for r in batch]
            starts = list(itertools.accumulate([0, *map(len, group)]))
            yield records, [list(range(a, b)) for a, b in zip(starts, starts[1:])]
    set_schedule_length(scheduler_fn, total_steps)
    bar = _progress_bar(main, total_steps, progress.step)
    ctx = StepContext(model, core, optimizer, scheduler_fn, collate, cache, acc, recipe, skipped)
    model.train()
    start = time.perf_counter()
    stop = False
    epochs = t.epochs or (1 if streamed is None else 10**12)  # a stream goes round until max_steps
    while progress.epoch < epochs and not stop:
        trained = False
        for records, group in epoch_groups(progress.epoch):
            trained = True
            collate.records = records
            if t.log_examples:
                _log_examples(out, acc, progress, group, records)
            loss, n_examples, audio_s, ctc_loss = _step(ctx, group, progress)
            progress.step += 1
            progress.micro_done += len(group)
            progress.examples += n_examples
            rate = progress.examples / max(time.perf_counter() - start, 1e-9)
            record = {
                "step": progress.step,
                "epoch": progress.epoch,
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "examples_per_s": rate,
                "audio_seconds": audio_s,
            }
            if ctc_loss is not None:
                record["ctc_loss"] = ctc_loss  # already inside "loss", weighted by train.ctc_weight
            if progress.step % t.log_every == 0 or progress.step == total_steps:
                metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", ex_s=f"{rate:.1f}")
                bar.update(1)
            if t.eval_every and progress.step % t.eval_every == 0 and eval_records:
                _evaluate(core, processor, eval_records, recipe, prompts, cache, metrics, progress.step, acc)
                model.train()
            if t.save_every and progress.step % t.save_every == 0:
                _save(recipe, core, processor, optimizer, progress, acc, metrics)
            if progress.step >= total_steps:
                stop = True
                break
        if not stop:
            if not trained and progress.micro_done == 0:  # only a stream can come up empty
                raise DataError([], message=f"epoch {progress.epoch}: the streamed training sources gave no usable "
                                            "example (bad ones are in bad_examples_train.jsonl)")
            progress.epoch += 1
            progress.micro_done = 0
    if bar is not None:
        bar.close()
    result = {
        "steps": progress.step,
        "examples": int(acc.reduce(torch.tensor([progress.examples], device=acc.device), "sum").item()),
        "seconds": time.perf_counter() - start,
        "resumed_from": str(resume) if resume else None,
    }
    if eval_records:
        result["eval"] = _evaluate(core, processor, eval_records, recipe, prompts, cache, metrics, progress.step, acc)
    _save(recipe, core, processor, optimizer, progress, acc, metrics)
    if main:
        save_final(out, lambda folder: core.save_pretrained(folder, processor))
        metrics.plot()
        result["final"] = str(out / "final")
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    metrics.close()
    acc.wait_for_everyone()
    return result


def _step(ctx: StepContext, group: list[list[int]], progress: Progress) -> tuple[float, int, float, float | None]:
    """One optimizer step over a group of micro-batches.

    Returns the mean loss across micro-batches and ranks, this rank's examples, their seconds of audio
    (from the records' clip lengths, so the same for every encoder and with or without the feature cache),
    and the mean unweighted CTC loss of the micro-batches that had one on this rank (None where none had).
    """
    model, core, optimizer, collate, acc, recipe = ctx.model, ctx.core, ctx.optimizer, ctx.collate, ctx.acc, ctx.recipe
    losses, ctc_losses, examples, audio_samples = [], [], 0, 0
    for k, indices in enumerate(group):
        batch = collate(indices)
        ids = batch.pop("example_ids")
        ctx.skipped.record(batch.pop("bad", []))
        if not ids:
            continue
        audio_samples += sum(sum(collate.records[i].clip_samples) for i in ids)
        teacher = batch.pop("teacher", None)
        batch = model_inputs(batch, core, collate.processor, ctx.cache, device=acc.device)
        sync = k == len(group) - 1
        with acc.no_sync(model) if not sync and acc.num_processes > 1 else contextlib.nullcontext():
            with acc.autocast():  # the text teacher's forward too, under the run's mixed precision
                output = model(**batch, labelled_logits_only=True, share_prefix=recipe.train.share_prefix)
                loss = _loss(output, batch["labels"], teacher, core, recipe.distill)
                if "ctc_loss" in output:
                    loss = loss + recipe.train.ctc_weight * output["ctc_loss"]
                    ctc_losses.append(float(output["ctc_loss"].detach()))
            bad = acc.reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=acc.device), "sum")
            if bad.item() > 0:
                wheres = [collate.records[i].where for i in ids]
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at step {progress.step + 1}, epoch "
                    f"{progress.epoch}, batch of {wheres}; the last good checkpoint is kept"
                )
            acc.backward(loss / len(group))
        losses.append(loss.detach())
        examples += len(ids)
    if recipe.optim.grad_clip:
        acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.optim.grad_clip)
    for g in optimizer.param_groups:
        g["lr"] = ctx.scheduler_fn(progress.step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=acc.device)
    ctc = sum(ctc_losses) / len(ctc_losses) if ctc_losses else None
    return acc.reduce(mean, "mean").item(), examples, audio_samples / SAMPLING_RATE, ctc


def _ctc_blank(processor) -> int:
    """The token id the CTC loss uses as its blank: the tokenizer's padding (else end-of-text) token,
    which no transcript contains."""
    tokenizer = processor.tokenizer
    blank = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if blank is None:
        raise ValueError("train.ctc_weight > 0 needs a tokenizer with a padding or end-of-text token for the blank")
    return int(blank)


def _loss(output, labels: torch.Tensor, teacher: dict | None, core, settings: DistillSettings) -> torch.Tensor:
    """ce_weight x the next-token loss, plus kl_weight x the text teacher's KL where the batch has one."""
    loss = output.loss * settings.ce_weight
    if teacher is not None and settings.kl_weight > 0:
        kl = teacher_kl(core, output.logits, labels, teacher, settings.temperature, output.get("logit_positions"))
        loss = loss + settings.kl_weight * kl
    return loss


def _log_examples(out: Path, acc, progress: Progress, group: list[list[int]], records) -> None:
    """Append which examples this rank trains on at the coming step (for auditing data order)."""
    line = {
        "step": progress.step + 1,
        "epoch": progress.epoch,
        "rank": acc.process_index,
        "examples": [records[i].where for batch in group for i in batch],
    }
    with (out / f"examples-rank{acc.process_index}.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def _progress_bar(main: bool, total: int, done: int):
    if not main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)


def _fill_cache(core, processor, cache, records, prompts, seed, acc) -> list[DataProblem]:
    """Encode every audio window of the train and eval records once, before the first step. Returns the
    records whose conversation cannot be rendered (audio that fails to decode in full, non-finite samples),
    each named by its manifest line; the others are all encoded. Under several processes each rank encodes
    (and, with transcript hints, decodes) its own share, then every rank reads what the others wrote, and the
    problems are gathered so that every rank leaves out the same records."""
    from accelerate.utils import gather_object

    from .cache import precompute

    share = records[acc.process_index :: acc.num_processes]
    every = Collator(processor, share, prompts, seed)
    bad: list[DataProblem] = []

    def render(indices: range) -> list:
        return processor([every.conversation(i) for i in indices], featurize=False,
                         return_labels=False).get("audio_windows", [])

    def windows(chunk: int = 32):
        # a chunk of conversations per call: with transcript hints, their windows are decoded in batches
        for start in range(0, len(share), chunk):
            indices = range(start, min(start + chunk, len(share)))
            try:
                yield from render(indices)
            except (ValueError, OSError):  # find which: one at a time
                for i in indices:
                    try:
                        found = render(range(i, i + 1))
                    except (ValueError, OSError) as err:
                        bad.append(DataProblem(share[i].where, str(err)))
                        continue
                    yield from found

    stats = precompute(core, processor.featurizer, windows(), cache, progress=acc.is_main_process)
    if acc.num_processes > 1:
        acc.wait_for_everyone()
        cache.refresh()
        if core.transcriber is not None:
            core.transcriber.reload()
        order = {r.where: i for i, r in enumerate(records)}
        bad = sorted(gather_object(bad), key=lambda problem: order[problem.where])
    if acc.is_main_process:
        logger.info("feature cache %s: %s%s", cache.directory, stats, f"; {len(bad)} bad examples" if bad else "")
    return bad


class BadExamples:
    """The examples a run skips once it has started (`data.skip_bad`), each logged once and appended to
    `path` (`bad_examples_train.jsonl`, after the problems the up-front check found) by the main process."""

    def __init__(self, path: Path, main: bool) -> None:
        self.path, self.main = path, main
        self.seen: set[str] = set()
        if path.is_file():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
                    self.seen.add(json.loads(line)["where"])

    def record(self, problems: list[DataProblem]) -> None:
        """Log and list each problem not recorded before in this run."""
        fresh = [p for p in problems if p.where not in self.seen]
        self.seen.update(p.where for p in fresh)
        for p in fresh:
            logger.warning("skipped bad example %s: %s (listed in %s)", p.where, p.message, self.path)
        if fresh and self.main:
            write_problems(fresh, self.path, append=True)


def _evaluate(core, processor, records, recipe, prompts, cache, metrics, step, acc) -> dict:
    result = {}
    if acc.is_main_process:
        # decoding grows its KV cache token by token: compiled layers would recompile at every new length
        with uncompiled(core.llm) if recipe.train.compile else contextlib.nullcontext():
            result = evaluate(core, processor, records, recipe, prompts, cache)
        metrics.write({"step": step, **{f"eval_{k}": v for k, v in result.items()}})
    acc.wait_for_everyone()
    return result


def _save(recipe, core, processor, optimizer, progress, acc, metrics) -> None:
    from .state import save_rank_rng, save_training_checkpoint

    save_rank_rng(recipe.output_dir, progress.step, acc.process_index)
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {
            "step": progress.step,
            "epoch": progress.epoch,
            "micro_done": progress.micro_done,
            "examples": progress.examples,
            "num_processes": acc.num_processes,
        }
        path = save_training_checkpoint(
            recipe.output_dir,
            progress.step,
            write_model=lambda p: core.save_pretrained(p, processor),
            model=core,
            optimizer=optimizer,
            state=state,
            keep=recipe.train.keep_checkpoints,
        )
        metrics.plot()
        logger.info("checkpoint %s", path)
    acc.wait_for_everyone()


def _check_earlier_run(out: Path, t) -> None:
    """Refuse to overwrite an earlier run's outputs by accident (a fresh run, not a resume)."""
    if t.resume_from is not None:
        return
    found = earlier_run(out)
    if found and not t.overwrite:
        raise OutputDirError(
            f"{out}: holds an earlier run ({', '.join(found)}); a fresh run would overwrite it. Continue that run "
            "with train.resume_from=latest, clear it with train.overwrite=true, or choose another output_dir"
        )
    if found:
        logger.info("%s: clearing the earlier run's outputs (%s): train.overwrite=true", out, ", ".join(found))
        clear_earlier_run(out)


def _maybe_resume(recipe, core, optimizer, progress, acc):
    from .state import load_optimizer, load_rank_rng, load_trainable_state, resolve_resume

    path = resolve_resume(recipe.output_dir, recipe.train.resume_from)
    if path is None:
        return None
    state = json.loads((path / "trainer_state.json").read_text())
    if state["num_processes"] != acc.num_processes:
        raise ValueError(f"{path} was written by {state['num_processes']} processes; resume with the same number")
    load_trainable_state(core, path / "trainable.safetensors")
    load_optimizer(optimizer, path)
    load_rank_rng(path, acc.process_index)
    progress.step, progress.epoch = state["step"], state["epoch"]
    progress.micro_done, progress.examples = state["micro_done"], state["examples"]
    if acc.is_main_process:
        logger.info("resumed from %s at step %d (epoch %d)", path, progress.step, progress.epoch)
    return path
