"""The PAPO training loop. Read `Trainer.rl_step` top to bottom: it is one RL step.

    prompts+images -> rollout (vLLM engines on every rank) -> rewards -> advantages (+ DAPO filter)
    -> old / reference / masked log-probs (no grad) -> PPO update over minibatches
    -> weight sync into the engines -> metrics -> checkpoint

Every rank runs the same code. Data loading and encoding are deterministic, so each rank encodes
the prompts itself. The rollout is split over the engines (parallel/context.py): each engine
generates its share of the prompts, its ranks grade its responses between them, and the results
are all-gathered, so every rank holds every experience. Per-token log-probs live on the last
pipeline stage, where the loss is computed.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_papo.algos.advantages import dynamic_sampling_keep, fill_with_informative_groups, grpo_advantages, overlong_penalty
from megatron_papo.algos.losses import papo_loss, papo_loss_from_logits
from megatron_papo.data.processor import VLProcessor
from megatron_papo.data.rewards import EvalResult, get_reward_fn
from megatron_papo.folders import write_text_atomic
from megatron_papo.ops.vocab_parallel import vocab_parallel_logprob
from megatron_papo.parallel.context import ParallelContext
from megatron_papo.parallel.distributed import collective_device
from megatron_papo.progress import Progress
from megatron_papo.rollout.engine import SamplingConfig
from megatron_papo.trainer import checkpoint as ckpt
from megatron_papo.trainer.batch import Experience, collate, make_micro_batches, split_response_values
from megatron_papo.trainer.build import (
    DataSource,
    build_engine,
    build_models,
    build_optimizer,
    build_weight_sync,
    check_engine_prompt,
    rollout_requests,
    sync_weights,
)
from megatron_papo.trainer.config import TrainConfig
from megatron_papo.trainer.metrics import MetricsLogger, validation_comparison
from megatron_papo.trainer.pipeline import run_micro_batches


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: ParallelContext | None = None, with_engine: bool = True):
        """`ctx`: the job's layout (default: read from megatron-core, rollout.tp from cfg).
        with_engine=False builds everything but the rollout engines (benchmarks of the update)."""
        self.cfg = cfg
        self.ctx = ctx = ctx or ParallelContext.from_megatron(cfg.rollout.tp)
        self.out = Path(cfg.output_dir)
        self.rank = ctx.rank
        self.dp_rank, self.dp_size = ctx.dp_rank, ctx.dp
        self.tp_group = ctx.tp_group
        self.last_stage = ctx.is_last_stage
        self.models = build_models(cfg)          # policy (DDP-wrapped chunks), reference, model config
        self.model_cfg = self.models.model_cfg
        v = self.model_cfg.vision
        self.patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2  # a pixel_values row
        self.processor: VLProcessor = self.models.processor
        self.data = DataSource(cfg)
        self.reward_fn = get_reward_fn(cfg.reward)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.models.policy, cfg.optim.lr)  # the RL updates
        self.state = ckpt.RunState()
        self.preemption = ckpt.PreemptionHandler(cfg.checkpoint.save_on_signal)
        resume_from = ckpt.find_resume_checkpoint(cfg.checkpoint)
        if resume_from is not None:
            self._load(resume_from)
        self.metrics = MetricsLogger(self.out, cfg.monitor, enabled=self.rank == 0, resume_step=self.state.step)
        self.engine = build_engine(cfg, self.models, self.out, ctx, self.data.max_images_per_prompt) if with_engine else None
        self.weight_sync = build_weight_sync(cfg, self.models, ctx)

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        cfg = self.cfg
        fresh = not self.state.sft_done
        if fresh:
            if cfg.sft_steps > 0:
                self.sft_warmup()
            self.models.copy_policy_to_reference()
            self.state.sft_done = True
            # the RL optimizer has not stepped (fresh Adam moments, scheduler at 0); with bf16 or the
            # distributed optimizer it holds fp32 copies of the weights, taken before the warm-up
            self.optimizer.reload_model_params()
        sync_weights(self.models, self.engine, self.weight_sync)
        validating = cfg.validation.problems > 0
        if fresh:
            start = self.validate(0) if validating else None  # the starting point RL is judged against
            # step 0 (its validation in validation/step_0.json): a killed run never redoes the warm-up,
            # except when killed during this first sync or validation. The metrics row only after the
            # save: a row without a checkpoint would make the rerun refuse the folder as another run's.
            self._save()
            if start is not None:
                self.metrics.log(0, start)
        alarm = None
        while self.state.step < cfg.steps:
            self.state.step += 1
            metrics, phases = self.rl_step(self.state.step)
            if validating and (self.state.step == cfg.steps or (
                    cfg.validation.interval and self.state.step % cfg.validation.interval == 0)):
                with _timed(phases, "validate"):
                    metrics |= self.validate(self.state.step)
            alarm = self.metrics.log(self.state.step, metrics, phases)  # rank 0 watches the alarms
            stop_for_alarm = _agreed(alarm is not None and cfg.monitor.stop_on_alarm)  # every rank stops with it
            stop = self.preemption.should_stop() or stop_for_alarm
            if stop or self.state.step == cfg.steps or (
                    cfg.checkpoint.save_interval and self.state.step % cfg.checkpoint.save_interval == 0):
                self._save()
            if stop:
                if self.rank == 0:
                    why = "training-health alarm" if stop_for_alarm else f"signal {self.preemption.received}"
                    print(f"stopping after step {self.state.step} ({why}); checkpoint saved", flush=True)
                break
        plots = self.metrics.close()
        before, after = (self.out / "validation" / f"step_{s:08d}.json" for s in (0, self.state.step))
        if self.rank == 0 and validating and self.state.step == cfg.steps and after.is_file():
            print(validation_comparison(json.loads(before.read_text()) if before.is_file() else None,
                                        json.loads(after.read_text())), flush=True)
        if self.rank == 0:
            print(f"outputs: {self.out.resolve()} (metrics.jsonl, tensorboard/, checkpoints/"
                  + (f", {plots[0].name}" if plots else "") + ")", flush=True)

    def close(self) -> None:
        """Stop the rollout engine. train.py calls it after run(), also when run() raised: an engine
        left to the interpreter's exit would tear down vLLM's process groups after torch.distributed
        is gone, and its "Invalid process group specified" would follow the real error."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # ------------------------------------------------------------------ one RL step
    def rl_step(self, step: int) -> tuple[dict, dict]:
        cfg, phases = self.cfg, {}
        with _timed(phases, "rollout"):
            experiences, rollout_metrics = self.collect_experiences(step)
        if cfg.rollout.dump and self.rank == 0:
            self._dump_rollouts(step, experiences)
        mine = self._my_share(experiences)
        with _timed(phases, "logprobs"):
            self.compute_logprobs(mine)
            # trainer vs rollout-engine log-probs of the same tokens: a stale or wrong weight sync shows
            # up here first (a correct one leaves only numerics and the top-p renormalisation)
            mismatch = self._from_last_stage({"rollout_logp_diff": _mean(
                abs(a - b) for e in mine if e.old_logp is not None
                for a, b in zip(e.old_logp.tolist(), e.rollout_logp))} if self.last_stage else {})
        with _timed(phases, "train"):
            train_metrics = self.update(mine)
        with _timed(phases, "sync"):
            sync_weights(self.models, self.engine, self.weight_sync)
        tokens = sum(e.length for e in experiences)
        metrics = {**rollout_metrics, **mismatch, **train_metrics, **self.data.skip_metrics(),
                   "tokens_per_s": tokens / max(sum(phases.values()), 1e-9)}
        return metrics, phases

    def collect_experiences(self, step: int) -> tuple[list[Experience], dict]:
        """Rollout + rewards + advantages (+ DAPO refill). Same result on every rank."""
        cfg, algo, n = self.cfg, self.cfg.algo, self.cfg.rollout.n

        def draw(attempt: int) -> list[list[Experience]]:
            return self._rollout_groups(self.data.next_batch(cfg.rollout_batch_size), step, attempt)

        def informative(groups: list[list[Experience]]) -> list[bool]:
            accuracy = torch.tensor([[e.accuracy for e in g] for g in groups]).flatten()
            return dynamic_sampling_keep(accuracy, n, algo.dynamic_sampling_low, algo.dynamic_sampling_high).tolist()

        if algo.dynamic_sampling:
            kept, all_groups = fill_with_informative_groups(draw, cfg.rollout_batch_size, informative,
                                                            cfg.rollout.dynamic_sampling_max_tries)
        else:
            kept = all_groups = draw(0)
        n_informative = sum(informative(all_groups))
        flat = [e for g in kept for e in g]
        rewards = torch.tensor([e.reward for e in flat])
        if algo.overlong_buffer_len > 0:
            lengths = torch.tensor([len(e.response_ids) for e in flat])
            rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, algo.overlong_buffer_len,
                                                 algo.overlong_penalty_factor)
        for e, a in zip(flat, grpo_advantages(rewards, n).tolist()):
            e.advantage = a
        seen = [e for g in all_groups for e in g]
        return flat, {
            "reward": _mean(e.reward for e in seen), "accuracy": _mean(e.accuracy for e in seen),
            "format": _mean(e.format_score for e in seen),
            "response_len": _mean(len(e.response_ids) for e in seen),
            "truncated": _mean(e.finish_reason == "length" for e in seen),
            "groups_drawn": len(all_groups),  # prompts rolled out (DAPO: more than the batch when refilling)
            "groups_informative": n_informative / max(len(all_groups), 1),  # mixed accuracy (DAPO filter)
        }

    def _rollout_groups(self, samples, step: int, attempt: int) -> list[list[Experience]]:
        """n responses per sample: each engine generates its share of the prompts, its ranks grade
        them, and every rank gets every group (module doc)."""
        cfg = self.cfg
        encoded = [self.processor.encode_sample(s, mask=cfg.mask) for s in samples]
        for s, enc in zip(samples, encoded):
            if len(enc.input_ids) > cfg.rollout.max_prompt_tokens:
                raise ValueError(f"sample {s.sample_id}: prompt of {len(enc.input_ids)} tokens (image tokens included) "
                                 f"exceeds rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
        responses = self._generate_and_grade(samples, self.models.sampling(cfg), step * 1000 + attempt)
        groups = []
        for gi, (s, enc, outs) in enumerate(zip(samples, encoded, responses)):
            group = []
            for prompt_ids, response_ids, logps, finish, reward in outs:
                check_engine_prompt(s.sample_id, prompt_ids, enc.input_ids.tolist())
                if not response_ids:  # an immediate stop: keep one EOS so the sequence has a target
                    response_ids, logps = [self.model_cfg.eos_token_id], [0.0]
                group.append(Experience.from_encoded(
                    enc, response_ids, logps, self.patch_dim, group=gi, finish_reason=finish,
                    reward=reward.reward, accuracy=reward.accuracy, format_score=reward.format))
            groups.append(group)
        return groups

    def _generate_and_grade(self, samples, sampling: SamplingConfig, seed_step: int) -> list[list[tuple]]:
        """[prompt][k] = (prompt ids, response ids, log-probs, finish reason, reward), on every rank.
        Seeds follow the global prompt index, so the responses do not depend on the engine count."""
        topology = self.ctx.rollout
        mine = topology.prompt_range(len(samples))
        outputs = []
        self.engine.wake_up()
        if len(mine):  # all ranks of an engine skip together
            outputs = self.engine.generate(rollout_requests(self.processor, [samples[i] for i in mine]),
                                           sampling, step=seed_step, prompt_indices=list(mine))
        self.engine.sleep()  # GPU: free the engine's memory for the log-prob passes and the update
        graded = []
        responses = [(i, k, o) for i, outs in zip(mine, outputs) for k, o in enumerate(outs)]
        for i, k, o in responses[topology.engine_rank::topology.tp]:  # this engine's ranks share the grading
            text = self.processor.tokenizer.decode(o.response_token_ids, skip_special_tokens=True)
            reward = self.reward_fn(text, samples[i].answer, samples[i].choices)
            graded.append((i, k, (o.prompt_token_ids, o.response_token_ids, o.response_logprobs, o.finish_reason,
                                  reward)))
        everyone = [None] * topology.world
        dist.all_gather_object(everyone, graded)
        result = [[None] * sampling.n for _ in samples]
        for i, k, value in (g for part in everyone for g in part):
            result[i][k] = value
        return result

    def _my_share(self, experiences: list[Experience]) -> list[Experience]:
        """This DP rank's responses: minibatch k of the step gives rank d its d-th slice."""
        per_update = self.cfg.global_batch_size * self.cfg.rollout.n
        share = per_update // self.dp_size
        mine = []
        for start in range(0, len(experiences), per_update):
            mine += experiences[start + self.dp_rank * share: start + (self.dp_rank + 1) * share]
        return mine

    def compute_logprobs(self, exps: list[Experience]) -> None:
        """old (policy, real image), reference (ref model, real image) and masked (policy, masked
        image) per-token log-probs, without gradient, before the update."""
        algo, T = self.cfg.algo, self.cfg.rollout.temperature
        # micro_batch_size / micro_batch_tokens count each sequence once, as in the exact modes' update:
        # a [real; masked] micro-batch forwards twice that, no-grad (its logits are as large as the
        # update's logits plus their gradient)
        chunks = make_micro_batches(exps, self.cfg.micro_batch_size, self.cfg.micro_batch_tokens)
        mbs = [self._collate(c) for c in chunks]  # collated once for every pass
        # the masked branch is PAPO's only extra cost: it rides in the old-policy forward as [real; masked]
        # (exact modes get it inside the update instead)
        attrs = ("old_logp", "masked_logp") if algo.needs_masked_logp else ("old_logp",)
        self.store_logprobs(chunks, mbs, self.models.policy, attrs, T)
        if algo.beta > 0:
            with self.models.reference_on_device():
                self.store_logprobs(chunks, mbs, [self.models.reference], ("ref_logp",), T)

    @torch.no_grad()
    def store_logprobs(self, chunks, mbs, model_chunks, attrs: tuple[str, ...], temperature: float) -> None:
        """Per-token log-probs of the experiences `chunks` (collated: `mbs`) into attrs[0] from the real
        images, and with a second attr into attrs[1] from the masked ones, in the same forward over
        [real; masked] (the same tokens twice, only the pixels differ)."""

        def on_logits(mb, logits):  # logits: [len(attrs) * B, S', V/TP] (mb: the window they cover)
            targets = mb.targets.repeat(len(attrs), 1)
            logp = vocab_parallel_logprob(logits, targets, self.tp_group, temperature, self.model_cfg.vocab_size)
            return logp.sum() * 0.0, {"logp": logp.detach().cpu(), "first_position": mb.first_position}

        for m in model_chunks:
            m.eval()
        outs = run_micro_batches(model_chunks, mbs, on_logits, forward_only=True,
                                 images="both" if len(attrs) == 2 else "real")
        for m in model_chunks:
            m.train()
        if self.last_stage:
            for chunk, out in zip(chunks, outs):
                for attr, values in zip(attrs, out["logp"].chunk(len(attrs))):
                    for e, v in zip(chunk, split_response_values(values, chunk, out["first_position"])):
                        setattr(e, attr, v)

    def update(self, exps: list[Experience]) -> dict:
        """PPO epochs over minibatches (one optimizer step each)."""
        cfg = self.cfg
        share = cfg.global_batch_size * cfg.rollout.n // self.dp_size
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.ppo_epochs):
            for start in range(0, len(exps), share):
                metrics = self.train_minibatch(exps[start: start + share])
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}

    def train_minibatch(self, exps: list[Experience]) -> dict:
        cfg, algo = self.cfg, self.cfg.algo
        by_tokens = cfg.micro_batch_tokens if algo.loss_agg_mode == "global_token_mean" else 0
        chunks = make_micro_batches(exps, cfg.micro_batch_size, by_tokens)
        mbs = [self._collate(c) for c in chunks]
        exact, both = algo.needs_logits, algo.needs_masked_logits  # both: [real; masked] in one forward
        scale = 1.0
        global_tokens = None
        if algo.loss_agg_mode == "global_token_mean":
            # megatron divides each micro-batch loss by their number and DDP averages over DP:
            # undo both so the summed gradient is that of the global token mean.
            from megatron_papo.algos.losses import count_global_tokens
            global_tokens = count_global_tokens([mb.response_mask for mb in mbs], self.ctx.dp_group)
            scale = len(mbs) * self.dp_size

        def on_logits(mb, logits):
            if exact:
                real, masked = logits.chunk(2, dim=0) if both else (logits, None)
                loss, m = papo_loss_from_logits(algo, self.tp_group, logits=real, target=mb.targets,
                                                old_logp=mb.old_logp, ref_logp=mb.ref_logp, advantages=mb.advantages,
                                                response_mask=mb.response_mask, masked_logits=masked,
                                                masked_logp=mb.masked_logp, temperature=cfg.rollout.temperature,
                                                valid_vocab_size=self.model_cfg.vocab_size,
                                                global_token_count=global_tokens)
            else:
                logp = vocab_parallel_logprob(logits, mb.targets, self.tp_group, cfg.rollout.temperature,
                                              self.model_cfg.vocab_size)
                loss, m = papo_loss(algo, logp=logp, old_logp=mb.old_logp, ref_logp=mb.ref_logp,
                                    masked_logp=mb.masked_logp, advantages=mb.advantages,
                                    response_mask=mb.response_mask, global_token_count=global_tokens)
            metrics = {k: float(v) for k, v in m.items()}
            if global_tokens is not None:  # report means over the step's tokens, not over micro-batches
                share = float(mb.response_mask.sum()) / global_tokens  # (the loss already is a sum / global_tokens)
                metrics = {k: v * scale * (1.0 if k == "loss" else share) for k, v in metrics.items()}
            return loss * scale, metrics

        lr = self.optimizer.param_groups[0]["lr"]  # this update's (the schedule then moves it on)
        outs, grad_norm = self.optimizer_step(self.optimizer, self.scheduler, mbs, on_logits,
                                              images="both" if both else "real")
        metrics = _mean_dicts(outs)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = lr
        return self._from_last_stage(metrics)

    def optimizer_step(self, optimizer, scheduler, mbs, on_logits, images: str = "real") -> tuple[list[dict], float]:
        """One update of the policy (the RL minibatch's and the warm-up's): zero the gradients, forward
        and backward the micro-batches (`on_logits` gives each one's loss), step the optimizer and its
        LR schedule. Returns the micro-batches' outputs and the gradient norm."""
        for chunk in self.models.policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outs = run_micro_batches(self.models.policy, mbs, on_logits, forward_only=False, images=images)
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        return outs, grad_norm

    def validate(self, step: int) -> dict:
        """avg@k and pass@k of the engines' weights on the validation split (ValidationConfig). Rank 0
        writes each problem's accuracy to validation/step_<N>.json, which the end of the run compares
        with step 0's, problem by problem."""
        v, samples = self.cfg.validation, self.data.validation
        sampling = dataclasses.replace(self.models.sampling(self.cfg), n=v.k, seed=v.seed)
        graded = self._generate_and_grade(samples, sampling, seed_step=0)  # seeds as eval's
        scores = EvalResult(k=v.k, problems=len(samples), rows=[
            {"sample_id": s.sample_id, "accuracy": out[4].accuracy, "format": out[4].format}
            for s, outs in zip(samples, graded) for out in outs])
        result = {"step": step, "problems": scores.problems, "k": v.k, "seed": v.seed, "accuracy": scores.avg,
                  "pass_at_k": scores.pass_at_k, "per_problem": scores.per_problem}
        if self.rank == 0:
            (self.out / "validation").mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "validation" / f"step_{step:08d}.json", json.dumps(result) + "\n")
        return {"val/accuracy": result["accuracy"], "val/pass_at_k": result["pass_at_k"]}

    # ------------------------------------------------------------------ warm start
    def sft_warmup(self) -> None:
        """Supervised steps on the synthetic task's `<think>..</think> \\boxed{}` targets, so the
        first rollouts are not all wrong (rewards all 0 -> advantages all 0 -> no signal)."""
        cfg = self.cfg
        # Its own optimizer, from the same builder: the warm-up has its own lr (sft_lr), and its Adam
        # moments and schedule steps must not carry into the RL updates, which start fresh.
        optimizer, scheduler = build_optimizer(cfg, self.models.policy, cfg.sft_lr)
        per_rank = max(cfg.sft_batch_size // self.dp_size, 1)
        bar = Progress(range(cfg.sft_steps), desc="sft warm-up", unit="steps", enabled=self.rank == 0)
        for i in bar:
            samples = self.data.next_sft_batch(cfg.sft_batch_size)
            exps = []
            for s in samples[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank]:
                enc = self.processor.encode_sample(s)
                target = self.processor.tokenizer(s.target, add_special_tokens=False)["input_ids"] + [self.model_cfg.eos_token_id]
                exps.append(Experience.from_encoded(enc, target, [], self.patch_dim, group=0))
            mbs = [self._collate(c) for c in make_micro_batches(exps, cfg.micro_batch_size)]

            def on_logits(mb, logits):
                logp = vocab_parallel_logprob(logits, mb.targets, self.tp_group, 1.0, self.model_cfg.vocab_size)
                m = mb.response_mask
                loss = -(logp * m).sum() / m.sum().clamp(min=1)
                return loss, {"sft_loss": float(loss.detach())}

            outs, _ = self.optimizer_step(optimizer, scheduler, mbs, on_logits)
            loss = self._from_last_stage(_mean_dicts(outs)).get("sft_loss", float("nan"))
            bar.set_postfix(loss=f"{loss:.3f}")

    # ------------------------------------------------------------------ helpers
    def _dump_rollouts(self, step: int, experiences: list[Experience]) -> None:
        folder = self.out / "rollouts"
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{"sample_id": e.sample_id, "group": e.group, "response_ids": e.response_ids, "reward": e.reward,
                 "accuracy": e.accuracy, "finish_reason": e.finish_reason, "advantage": e.advantage}
                for e in experiences]
        (folder / f"step_{step:08d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _collate(self, exps: list[Experience]):
        # sequence parallel splits the sequence over the TP ranks: pad it to a multiple of TP
        multiple = self.cfg.parallel.tp if self.cfg.parallel.sequence_parallel else 1
        return collate(exps, pad_id=self.model_cfg.bos_token_id, pad_to_multiple=multiple)

    def _from_last_stage(self, metrics: dict) -> dict:
        """Mean of the last stage's metrics over DP replicas, on every rank (same keys everywhere)."""
        contributes = self.last_stage and self.ctx.tp_rank == 0
        key_sets = [None] * dist.get_world_size()
        dist.all_gather_object(key_sets, sorted(metrics) if contributes else [])
        keys = sorted(set().union(*key_sets))
        values = torch.tensor([metrics.get(k, 0.0) if contributes else 0.0 for k in keys] + [float(contributes)],
                              dtype=torch.float64, device=collective_device())
        dist.all_reduce(values)
        values = values.cpu()
        n = max(values[-1].item(), 1.0)
        return {k: v / n for k, v in zip(keys, values[:-1].tolist())}

    def _save(self) -> None:
        train_state = dataclasses.asdict(self.state) | {"data": self.data.state_dict()}
        ckpt.save_checkpoint(self.cfg.checkpoint, self.state.step, self.models.checkpoint_modules(),
                             self.optimizer, self.scheduler, train_state, self.ctx, run_config=self.cfg,
                             write_extras=self.models.write_model_files)

    def _load(self, path: Path) -> None:
        if self.rank == 0:
            print(f"resuming from {path}", flush=True)
        train_state = ckpt.load_checkpoint(path, self.models.checkpoint_modules(), self.optimizer, self.scheduler,
                                           self.ctx)
        self.data.load_state_dict(train_state.pop("data"))
        self.state = ckpt.RunState(**{k: v for k, v in train_state.items() if k in ckpt.RunState.__dataclass_fields__})


def _agreed(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (collective)."""
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@contextmanager
def _timed(phases: dict, name: str):
    start = time.perf_counter()
    yield
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = {k for d in dicts for k in d}
    return {k: _mean(d[k] for d in dicts if k in d) for k in keys}
