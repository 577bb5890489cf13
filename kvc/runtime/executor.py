"""CompiledModel: runs the lowered prefill and decode graphs against an OffloadedCache.

The generate loop is the only host-side logic per step: pick the split for this context
(pure Python, from the Plan), call the decode graph, choose the token on the device
(kvc.runtime.sampling: argmax, or transformers' sampling). Tokens stay on the device; the host
synchronises once, at the end, or once a step when EOS ids may stop the batch early. Handed a `partition` (the
CUDA-graph pass, passes/cudagraphs.py: kvc.api hands it over when the Plan says
`cuda_graphs`), the decode graph runs partitioned: its static runs replay as CUDA graphs
(kvc.runtime.segments), captured at the second step of the first generate for a batch size.
The runtime knows no planner and no compiler: it is given lowered graphs and a Plan.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvc.errors import KvcError
from kvc.ir import registry
from kvc.ir.graph import direct_calls
from kvc.ir.plan import Plan
from kvc.models.spec import ModelSpec
from kvc.progress import bar
from kvc.runtime.attention import backends
from kvc.runtime.offloaded import OffloadedCache
from kvc.runtime.padding import left_pads, without_padding
from kvc.runtime.parallel import SINGLE, Ranks
from kvc.runtime.sampling import Sampler, Stopping, check_max_new_tokens
from kvc.runtime.segments import SegmentSet
from kvc.runtime.weights import WeightStreamer


class CompiledModel:
    def __init__(self, lowered, plan: Plan, spec: ModelSpec, dtype: torch.dtype,
                 device: torch.device, manifest: dict | None = None, partition=None,
                 ranks: Ranks = SINGLE):
        """`lowered`: the compiler's graphs (`prefill`, `decode`, `num_events`, `code`).
        `partition(gm, wrap)`: run the decode step partitioned into segments that `wrap`
        makes, CUDA graphs on a CUDA device, eager on a CPU (None: unpartitioned).
        `ranks`: this process's place in a multi-GPU job (kvc.runtime.parallel): it decodes
        its share of each batch's rows and gathers the others' logits every step."""
        self.lowered, self.plan, self.spec, self.ranks = lowered, plan, spec, ranks
        self.dtype, self.device = dtype, torch.device(device)
        self.manifest = manifest or {}
        self._cache: OffloadedCache | None = None
        self._rt: int | None = None
        # weight-streamed layers: their parameters move to pinned CPU pools now, at load time,
        # and point into the GPU weight slots the graphs' prefetch_weights fill
        self._weights = (WeightStreamer(plan, lowered.decode, self.device)
                         if plan.streamed_layers else None)
        # the graphs as they run: kvc ops called without the dispatcher (kvc.ir.ops.DIRECT);
        # the partition reads the parameters as they are now, after the weight streamer
        # pointed the streamed ones into their slots (fixed addresses a graph may read)
        self.prefill_step = direct_calls(lowered.prefill)
        self.decode_step = direct_calls(lowered.decode)
        self.graphs = None
        if partition is not None:
            self.graphs = SegmentSet(capture=self.device.type == "cuda")
            self.decode_step = partition(self.decode_step, self.graphs.wrap)

    @property
    def graph_code(self) -> str:
        return self.lowered.code

    @property
    def batch_size(self) -> int:
        """The batch this artifact was compiled for, all ranks' rows together (a Plan is one
        rank's: its batch_size is that rank's share)."""
        return self.plan.batch_size * (self.ranks.world if self.ranks.splits_rows else 1)

    @property
    def workload(self) -> tuple[int, int]:
        """(prompt_len, gen_len) the artifact was compiled for (a token split's plan holds a
        rank's share of them; its notes keep the whole)."""
        whole = self.plan.notes.get("parallel", {})
        return whole.get("prompt_len", self.plan.prompt_len), whole.get("gen_len", self.plan.gen_len)

    @property
    def max_context(self) -> int:
        """The most tokens a row may reach, prompt and new tokens together (p + n): what the
        pools hold (a token split's plan is one rank's, over its share of each context)."""
        return min(self.spec.max_positions, self.plan.pool_context)

    def _runtime(self, batch: int, prompt: int, tokens: int) -> tuple[OffloadedCache, int]:
        """The pools for `batch` sequences: with micro-batches, one set per unit of batch/m."""
        c = self._cache
        # a cache made for longer prompts keeps fewer K,V rows than a shorter one reads
        if (c is None or c.batch != batch // self.plan.micro_batches or c.max_tokens < tokens
                or c.min_context > prompt):
            # at least the compiled workload's rows; a call that outgrows them grows the pools
            # geometrically (up to max_context), so a job of growing prompts rebuilds them
            # a few times, not at every batch (pinning gigabytes takes seconds)
            grown = (min(self.max_context, 2 * c.max_tokens)
                     if c is not None and c.max_tokens < tokens else 0)
            self.close()
            max_tokens = max(tokens, sum(self.workload), grown)
            with bar("kvc: allocating KV/activation pools", total=1, unit="pool set") as shown:
                c = self._allocate(batch, max_tokens, min(prompt, self.plan.prompt_len))
                shown.update()
            self._cache, self._rt = c, registry.register(c)
        return c, self._rt

    def _allocate(self, batch: int, max_tokens: int, min_context: int) -> OffloadedCache:
        return OffloadedCache(
            self.plan, num_layers=self.plan.num_units, batch=batch // self.plan.micro_batches,
            max_tokens=max_tokens,
            act_width=self.spec.hidden_size, num_kv_heads=self.spec.num_kv_heads,
            head_dim=self.spec.head_dim, dtype=self.dtype, device=self.device,
            num_events=self.lowered.num_events, weights=self._weights, min_context=min_context,
            windows=tuple(self.spec.window(self.plan.unit_layer(u))
                          for u in range(self.plan.num_units)), ranks=self.ranks)

    def close(self) -> None:
        """Free the pools (after the copies still using them finish)."""
        if self._rt is not None:
            registry.release(self._rt)
        if self._cache is not None:
            self._cache.close()
        self._cache, self._rt = None, None
        if self.graphs is not None:
            self.graphs.reset()  # their buffers are sized for the old batch

    def _check_contexts(self, prompt: int, new: int) -> None:
        for s in {prompt, prompt + new - 2} if new > 1 else ():
            s = self.plan.share_context(s)  # a token split's table: a rank's share
            for layer in range(self.plan.num_units):
                try:
                    self.plan.recompute_tokens(layer, s)
                except ValueError as e:
                    raise KvcError(str(e)) from None

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, return_logits: bool = False,
                 on_token: Callable[[int, torch.Tensor], None] | None = None, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None):
        """Tokens [b, s + n], or (tokens, logits [b, n, vocab]): the raw logits of the n steps run.

        Greedy unless `do_sample`; sampling and stopping as transformers' generate
        (kvc.runtime.sampling): with `eos_token_id` (an id or a list) a row that emitted one
        is finished and gets `pad_token_id` (default: the first EOS id) after it, and decoding
        stops once every row has finished, so n <= max_new_tokens.

        `on_token(step, tokens[b])` is called after each new token (step 0 is the prefill's),
        with the tokens still on the device: a caller that streams text pays the host sync it
        asks for, one that does not pays nothing (EOS stopping syncs once a step). It may return
        a bool per row (a list or tensor [b]): True finishes that row now (a stop string), as
        an EOS would.

        `attention_mask` [b, s] (1: a token, 0: padding), transformers' left padding: a row's
        padding comes before its prompt, its positions start at its first token, no query
        attends to padding (kvc.runtime.padding), so each row decodes as it would alone.
        Columns that every row pads are dropped before the prefill (they would cost PCIe
        bytes and compute for nothing) and are returned as given."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise KvcError(f"input_ids must be [batch, tokens] with tokens >= 1, got {tuple(input_ids.shape)}")
        check_max_new_tokens(max_new_tokens)
        sampler = Sampler(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        head, pads = None, None
        if attention_mask is not None:
            # read where the mask is (a tokenizer's: the CPU, so the host never waits on the GPU)
            pads = left_pads(attention_mask, input_ids)
            cut = int(pads.min())
            if cut:
                head, input_ids, pads = input_ids[:, :cut], input_ids[:, cut:], pads - cut
            pads = pads if bool(pads.any()) else None  # the caches move it to the device
        b, p = input_ids.shape
        stopping = Stopping(eos_token_id, pad_token_id, b, self.spec.vocab_size, self.device)
        if p + max_new_tokens > self.spec.max_positions:
            raise KvcError(f"prompt {p} + {max_new_tokens} new tokens exceeds the model's "
                           f"maximum positions ({self.spec.max_positions})")
        self._check_contexts(p, max_new_tokens)
        prompt = input_ids.to(self.device)
        # several GPUs (kvc.runtime.parallel), a row split: the batch, padded with copies of
        # its last row to world x k rows, is split by rows; this rank decodes its k and gathers
        # the others' logits each step, so every rank chooses (and returns) the whole batch's
        # tokens. A token split: every rank decodes every row (the caches split the context)
        ranks = self.ranks
        k = ranks.share(b) if ranks.splits_rows else b
        grow, mine = ranks.world * k - b if ranks.splits_rows else 0, ranks.rows(b)
        ids, row_pads = prompt, pads
        if grow:
            ids = torch.cat([ids, ids[-1:].expand(grow, p)])
            row_pads = None if pads is None else torch.cat([pads, pads[-1:].expand(grow)])
        ids = ids[mine]
        if row_pads is not None:
            row_pads = row_pads[mine]
            row_pads = row_pads if bool(row_pads.any()) else None
        # the block schedule splits the batch into equal micro-batches: a batch that does not
        # split is padded with copies of its last row, computed and dropped (cost, not error)
        pad = -k % self.plan.micro_batches
        if pad:
            ids = torch.cat([ids, ids[-1:].expand(pad, p)])
            row_pads = None if row_pads is None else torch.cat([row_pads, row_pads[-1:].expand(pad)])
        # the tokens so far, for the repetition penalty only (the real rows): without one a
        # decode step does nothing here but choose its token
        seen = None
        if sampler.repetition_penalty != 1.0:
            seen = torch.empty((b, p + max_new_tokens), dtype=torch.long, device=self.device)
            seen[:, :p] = prompt
            if pads is not None:  # a row's padding is no token of its: repeat its first token
                seen[:, :p] = without_padding(prompt, pads.to(self.device, non_blocking=True))

        def choose(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(the batch's logits [b, vocab], its tokens [b], this rank's next input rows)."""
            # the real rows choose (a sampler's draws must not depend on the padding rows);
            # the padding rows repeat the last real row, which they copy
            logits = ranks.gather(logits[:k])[:b]
            tok = sampler(logits, None if seen is None else seen[:, :p + n])
            if ranks.splits_tokens:  # every rank computed the same: decode rank 0's, to be sure
                tok = ranks.same(tok)
            tok = stopping(tok)
            if seen is not None:
                seen[:, p + n] = tok
            step = torch.cat([tok, tok[-1:].expand(grow)])[mine] if ranks.splits_rows else tok
            return logits, tok, torch.cat([step, step[-1:].expand(pad)]) if pad else step

        cache, rt = self._runtime(k + pad, p, p + max_new_tokens)
        cache.set_padding(row_pads)
        with bar("kvc: generating", total=max_new_tokens, unit="step") as steps, backends():
            cache.begin_step(0, p)
            logits = self.prefill_step(ids, cache.step_positions(0, p), rt)[:, -1]
            cache.end_step(p)
            logits, tok, step_in = choose(logits, 0)
            tokens, all_logits = [tok], [logits]
            if on_token is not None:
                stopping.finish(on_token(0, tok))
            steps.update()
            for step in range(1, max_new_tokens):
                if stopping.done:
                    break
                s = cache.s
                cache.begin_step(s, 1)
                logits = self.decode_step(step_in[:, None], cache.step_positions(s, 1), rt)[:, -1]
                cache.end_step(1)
                logits, tok, step_in = choose(logits, step)
                tokens.append(tok)
                all_logits.append(logits)
                if on_token is not None:
                    stopping.finish(on_token(step, tok))
                steps.update()
        cache.finish()
        out = torch.cat([prompt, torch.stack(tokens, 1)], 1)
        if head is not None:
            out = torch.cat([head.to(out.device), out], 1)
        if return_logits:
            return out, torch.stack(all_logits, 1).float()
        return out
