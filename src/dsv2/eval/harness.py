"""lm-evaluation-harness model "dsv2": `DSV2LM`, a `TemplateLM` over dsv2's Scorer and engine.

    pip install 'dsv2[eval]'
    dsv2 eval harness runs/demo/pretrain/hf --tasks my_task --include-path my_tasks/
    lm_eval --model dsv2 --model_args pretrained=PATH,dtype=bfloat16 --tasks hellaswag   # after `import dsv2.eval.harness`

    import lm_eval
    from dsv2.eval.harness import DSV2LM
    lm_eval.simple_evaluate(model=DSV2LM(pretrained=PATH, batch_size=16), tasks=[...])

The three request kinds keep the harness's meaning:
- loglikelihood: the harness tokenizes (context, continuation) (TemplateLM._encode_pair); the
  Scorer (engine/score.py) scores continuations, computing each distinct context once, so the
  choices of a question share it. Contexts are left-truncated to max_length + 1 tokens in all.
- loglikelihood_rolling: the document with the prefix token (BOS, else EOS) first, through
  eval/perplexity.py's windows of max_length at stride max_length: the same windows as
  the harness's get_rolling_token_windows, and what `dsv2 eval perplexity` computes.
- generate_until: greedy decoding through the slot engine (dsv2.LLM), stopping at EOS or the
  first `until` string, prompts left-truncated to max_length - max_gen_toks.
Requests are sorted longest first (the harness's Collator order) so batches pad little.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model


@register_model("dsv2")
class DSV2LM(TemplateLM):
    def __init__(self, pretrained: str, dtype: str | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = False,
                 native: bool | None = None, **_):
        super().__init__()
        from ..engine import LLM
        from ..engine.score import Scorer
        from .runner import load_model
        path = Path(pretrained)
        self.model, self.tokenizer = load_model(path, dtype)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = 16 if batch_size in ("auto", None) else int(str(batch_size).split(":")[0])
        self.scorer = Scorer(self.model, max_len=self._max_length, max_rows=max(self.batch_size, 1))
        self.llm = LLM(self.model, tokenizer=self.tokenizer, max_batch_slots=self.batch_size,
                       max_len=self._max_length, native=native)
        self.path, self.add_bos_token = path, bool(add_bos_token)

    # ------------------------------------------------------------ tokenizer
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """add_special_tokens None means add_bos_token (False unless asked, as for the harness's HF
        model: tasks' prompts carry no BOS), and never a second BOS before text that starts with one."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = self.add_bos_token and not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_bos=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens, skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from ..tokenizer import DEEPSEEK_CHAT_TEMPLATE
        return self.tokenizer.chat_template or DEEPSEEK_CHAT_TEMPLATE if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tqdm import tqdm
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        with tqdm(total=len(pairs), desc="dsv2 loglikelihood", disable=disable_tqdm) as bar:
            out = self.scorer.loglikelihood(pairs, bar)
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from tqdm import tqdm

        from .perplexity import score_windows
        out = []
        for req in tqdm(requests, desc="dsv2 loglikelihood_rolling", disable=disable_tqdm):
            (string,) = req.args
            ids = [self.prefix_token_id] + self.tok_encode(string)
            nll, _ = score_windows(self.model, ids, self.max_length, self.max_length, batch=self.batch_size)
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), -nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        jobs: dict[tuple, list[int]] = {}   # (max_gen_toks, until) -> request indices: one generate() each
        prompts = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) not in (0, 0.0, None):
                raise ValueError("dsv2's harness model decodes greedily: leave do_sample off and temperature at 0.")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if n >= self.max_length:
                raise ValueError(f"max_gen_toks {n} must be under the model's {self.max_length}-token window.")
            prompts.append(self.tok_encode(context)[-(self.max_length - n):])
            jobs.setdefault((n, tuple(until)), []).append(i)
        results: list[str] = [""] * len(requests)
        for (n, until), idx in jobs.items():
            idx = sorted(idx, key=lambda i: -len(prompts[i]))
            outs = self.llm.generate([prompts[i] for i in idx], max_new_tokens=n, temperature=0.0,
                                     stop=[u for u in until if u] or None)
            for i, o in zip(idx, outs):
                results[i] = o.text
                self.cache_hook.add_partial("generate_until", requests[i].args, o.text)
        return results
