"""`dsv2 eval`: perplexity, tasks and lm-evaluation-harness on a checkpoint.

    dsv2 eval perplexity MODEL --text held_out.txt [--max-len 1024] [--stride 512] [--json]
    dsv2 eval perplexity MODEL --text long.txt --lengths 256,512,1024 --plot ppl.png
    dsv2 eval tasks MODEL --tasks python_mc arithmetic [--shots 3] [--limit 100] [--out runs/eval]
    dsv2 eval niah MODEL --lengths 1k,2k,4k --depths 0,10,...,100 [--trials 2] [--passkey] [--out runs/niah]
    dsv2 eval harness MODEL --tasks my_task --include-path tasks/ [--limit 50]    # needs dsv2[eval]

Every verb runs offline; docs/evaluation.md has the details and how to run MMLU, GSM8K or
C-Eval from local copies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..dtypes import KV_CACHE_DTYPES, QUANTIZE
from ..options import add_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: perplexity, tasks, lm-evaluation-harness",
                       description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="eval_verb", metavar="KIND", required=True)

    ppl = verbs.add_parser("perplexity", help="sliding-window perplexity and bits per byte of text files")
    ppl.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    ppl.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, one document each")
    ppl.add_argument("--max-len", type=int, default=None,
                     help="tokens a window reads (default: the model's context, at most 2048)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: max-len)")
    ppl.add_argument("--batch", type=int, default=8, help="windows per forward (default 8)")
    ppl.add_argument("--lengths", default=None,
                     help="comma list of context lengths: perplexity of the same final tokens at each, and a PNG")
    ppl.add_argument("--tail", type=int, default=None,
                     help="with --lengths: final tokens scored per document (default: half the shortest length)")
    ppl.add_argument("--plot", default=None, help="with --lengths: the PNG's path (default MODEL/ppl_vs_context.png)")
    ppl.add_argument("--json", action="store_true", help="end with one line of JSON (tokens, nll, ppl, bits_per_byte, bytes)")
    add_dtype(ppl)
    _add_formats(ppl)
    ppl.set_defaults(func=_perplexity)

    t = verbs.add_parser("tasks", help="multiple-choice, generation and rolling log-likelihood tasks")
    t.add_argument("model", help="checkpoint directory")
    t.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help="built-in names (arithmetic, copy, reverse, python_mc, passkey, python_bpb), templates "
                        "(mmlu, gsm8k, ceval) or task .yaml files; NAME:key=value,... overrides keys")
    t.add_argument("--shots", type=int, default=None, help="few-shot examples (default: each task's num_fewshot)")
    t.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    t.add_argument("--out", default=None, help="write results.json and samples_<task>.jsonl here")
    add_dtype(t)
    _add_formats(t)
    t.set_defaults(func=_tasks)

    n = verbs.add_parser("niah", help="needle-in-a-haystack (or --passkey) accuracy over lengths x depths, "
                                      "with a heat map")
    n.add_argument("model", help="checkpoint directory")
    n.add_argument("--lengths", required=True, help="prompt lengths in tokens: 512,1k,2k,... (k = 1024)")
    n.add_argument("--depths", default="0,10,...,100", help="needle depths in percent (default 0,10,...,100)")
    n.add_argument("--trials", type=int, default=1, help="prompts (keys) per cell (default 1)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--passkey", action="store_true", help="the YaRN paper's passkey test instead of NIAH")
    n.add_argument("--key-digits", type=int, default=7, help="digits of each key (default 7)")
    n.add_argument("--batch", type=int, default=8, help="prompts decoded together (default 8)")
    n.add_argument("--out", default=None, help="write niah.json and niah.png here (default MODEL/niah)")
    add_dtype(n)
    _add_formats(n)
    n.set_defaults(func=_niah)

    h = verbs.add_parser("harness", help="lm-evaluation-harness's simple_evaluate with the dsv2 model (dsv2[eval])")
    h.add_argument("model", help="checkpoint directory")
    h.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names")
    h.add_argument("--include-path", default=None, help="a folder of lm-eval task YAMLs")
    h.add_argument("--shots", type=int, default=None, help="num_fewshot")
    h.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    h.add_argument("--out", default=None, help="write the results JSON here")
    add_dtype(h)
    h.set_defaults(func=_harness)


def _add_formats(p) -> None:
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="int8 or fp8 weights (dsv2.quant), to measure what a deployment loses")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="score through a latent cache of this format (engine/cache.py; default: none for "
                        "perplexity, the model's dtype for tasks)")


def _load(args):
    from .runner import load_model
    return load_model(args.model, args.dtype, args.quantize)


def _perplexity(args) -> int:
    from .perplexity import context_curve, default_window, perplexity, plot_curve, read_documents
    for f in args.text:   # a missing file is reported before the model loads
        if not Path(f).is_file():
            raise FileNotFoundError(f"no text file at {f}: --text takes paths of UTF-8 text files.")
    model, tok = _load(args)
    docs = read_documents(args.text, tok)
    if args.lengths:
        try:
            lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
        except ValueError:
            raise ValueError(f"--lengths takes a comma list of integers, got {args.lengths!r}.") from None
        rows = context_curve(model, docs, lengths, args.tail or max(1, lengths[0] // 2), args.batch, progress=True,
                             kv_cache_dtype=args.kv_cache_dtype)
        for r in rows:
            print(f"context {r['max_len']:>6}: ppl {r['ppl']:.4f} over {r['tokens']:,} tokens of {r['documents']} documents")
        png = plot_curve(rows, Path(args.plot) if args.plot else Path(args.model) / "ppl_vs_context.png",
                         f"{Path(args.model).name}: perplexity against context")
        print(f"plot: {png}")
        if args.json:
            print(json.dumps(rows))
        return 0
    max_len = args.max_len or default_window(model)
    r = perplexity(model, docs, max_len, args.stride, args.batch, progress=True, kv_cache_dtype=args.kv_cache_dtype)
    print(f"{r['tokens']:,} tokens scored in {len(docs)} document(s), {r['bytes']:,} bytes: nll {r['nll']:.4f} nats, "
          f"ppl {r['ppl']:.4f}, {r['bits_per_byte']:.4f} bits per byte (max-len {max_len}, "
          f"stride {args.stride or max_len})")
    if args.json:
        print(json.dumps(r))
    return 0


def _tasks(args) -> int:
    from .runner import run_task, table, write_results
    from .tasks import load_task
    if args.shots is not None and args.shots < 0 or args.limit is not None and args.limit < 1:
        raise ValueError("--shots must be 0 or more and --limit 1 or more.")
    model, tok = _load(args)
    tasks = [load_task(name, tok) for name in args.tasks]   # every task file is checked before any runs
    from ..engine import LLM
    from ..engine.score import Scorer
    kv = args.kv_cache_dtype
    scorer, llm = Scorer(model, kv_cache_dtype=kv), LLM(model, tokenizer=tok, kv_cache_dtype=kv)
    results, samples = {}, {}
    for task in tasks:
        results[task.task], samples[task.task] = run_task(task, model, tok, args.shots, args.limit, scorer, llm,
                                                          kv_cache_dtype=kv)
    print(table(results))
    if args.out:
        path = write_results(Path(args.out), results, samples,
                             {"model": str(args.model), "tasks": args.tasks, "shots": args.shots, "limit": args.limit,
                              "dtype": str(next(model.parameters()).dtype)})
        print(f"wrote {path} and samples_<task>.jsonl")
    return 0


def _niah(args) -> int:
    from ..engine import LLM
    from .niah import parse_depths, parse_lengths, run_niah, write_outputs
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)   # checked before the model loads
    if args.batch < 1:
        raise ValueError(f"--batch must be 1 or more, got {args.batch}.")
    model, tok = _load(args)
    llm = LLM(model, tokenizer=tok, max_batch_slots=args.batch, kv_cache_dtype=args.kv_cache_dtype)
    report = run_niah(llm, lengths, depths, args.trials, args.seed, args.passkey, args.batch,
                      key_digits=args.key_digits)
    report["model"] = str(args.model)
    js, png = write_outputs(report, Path(args.out) if args.out else Path(args.model) / "niah",
                            Path(args.model).name)
    print(f"{report['mode']}: {report['accuracy']:.1%} of {len(report['results'])} prompts correct")
    for n in lengths:
        row = [report["cells"][f"{n}x{d}"] for d in depths]
        print(f"  length {n:>7,}: " + " ".join(f"{v:4.0%}" for v in row))
    print(f"wrote {js} and {png}")
    return 0


def _harness(args) -> int:
    try:
        import lm_eval
    except ImportError:
        raise ValueError("lm-evaluation-harness is not installed: pip install 'dsv2[eval]'.") from None
    from .harness import DSV2LM
    lm = DSV2LM(pretrained=args.model, dtype=args.dtype, batch_size=args.batch_size)
    task_manager = lm_eval.tasks.TaskManager(include_path=args.include_path) if args.include_path else None
    out = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.shots, limit=args.limit,
                                  task_manager=task_manager, apply_chat_template=args.apply_chat_template)
    from lm_eval.utils import make_table
    print(make_table(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out["results"], indent=2, default=str))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
