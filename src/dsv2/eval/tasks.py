"""The task format of `dsv2 eval tasks`: one YAML file (the task) + JSONL files (its documents).

    task: gsm8k                       # the name in tables and output files
    output_type: generate_until       # multiple_choice | generate_until | loglikelihood_rolling
    dataset:                          # split name -> JSONL file (relative to this YAML, or absolute) ...
      test: gsm8k/test.jsonl
      train: gsm8k/train.jsonl
      # ... or a built-in generator (eval/builtin.py): generator: arithmetic, splits: {test: 200}, args: {...}
    test_split: test                  # the documents scored
    fewshot_split: train              # where few-shot examples come from (default: test_split, minus the doc)
    num_fewshot: 5                    # overridden by --shots
    fewshot_seed: 1234                # examples are drawn per document from (seed, document index)
    description: ""                   # text put before the examples
    doc_to_text: "Question: {{question}}\nAnswer:"    # a Jinja template over one document's fields
    doc_to_target: "{{answer}}"                       # template, or a field name; for multiple_choice the
                                                      # gold index or the gold choice's text
    doc_to_choice: choices            # multiple_choice: a list field, or a list of strings / templates
    target_delimiter: " "             # between the question and its answer (or choice)
    fewshot_delimiter: "\n\n"         # between examples
    generation_kwargs: {until: ["\n\n"], max_gen_toks: 256}   # generate_until: greedy, cut at `until`
    filter: {regex: "#### (\\-?[0-9\\.\\,]+)", group: 1}     # generate_until: what exact_match compares
    chance: 0.25                      # the score of guessing, shown beside the result

The key names and their meaning follow lm-evaluation-harness, so a task written for one
reads the same in the other. A string holding "{{" is a template; any other string names a
field. Unknown keys are refused by name.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood_rolling")
BUILTIN_DIR = Path(__file__).parent / "tasks"
TEMPLATE_DIR = Path(__file__).parent / "templates"


class TaskError(ValueError):
    """A task file or document that cannot be used: the message names what and where."""


@dataclass
class Task:
    task: str
    output_type: str
    dataset: dict
    test_split: str = "test"
    fewshot_split: str | None = None
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    description: str = ""
    doc_to_text: str = "{{text}}"
    doc_to_target: str | int | None = None
    doc_to_choice: str | list | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    generation_kwargs: dict = field(default_factory=dict)
    filter: dict | None = None
    chance: float | None = None
    source: str = ""            # the file it came from (not a YAML key)
    docs: dict = field(default_factory=dict, repr=False)   # split -> [doc], filled by load()

    # ------------------------------------------------------------ templates
    def _render(self, spec, doc: dict, what: str):
        if isinstance(spec, int):
            return spec
        if not isinstance(spec, str):
            raise TaskError(f"{self.source}: {what} must be a template or a field name, got {spec!r}.")
        if "{{" in spec or "{%" in spec:
            try:
                return _template(spec).render(**doc)
            except Exception as e:   # jinja's UndefinedError and syntax errors
                raise TaskError(f"{self.source}: {what} {spec!r} failed on a document with fields "
                                f"{sorted(doc)}: {e}.") from None
        if spec not in doc:
            raise TaskError(f"{self.source}: {what} names the field {spec!r}, but a document has only {sorted(doc)}.")
        return doc[spec]

    def text(self, doc: dict) -> str:
        return str(self._render(self.doc_to_text, doc, "doc_to_text"))

    def choices(self, doc: dict) -> list[str]:
        if isinstance(self.doc_to_choice, list):   # literal choices, or templates
            return [str(self._render(c, doc, "doc_to_choice")) if "{{" in str(c) else str(c)
                    for c in self.doc_to_choice]
        value = self._render(self.doc_to_choice, doc, "doc_to_choice")
        if not isinstance(value, list) or len(value) < 2:
            raise TaskError(f"{self.source}: doc_to_choice must give a list of at least two choices, got {value!r}.")
        return [str(v) for v in value]

    def gold(self, doc: dict) -> int:
        """multiple_choice: the index of the right choice."""
        value, choices = self._render(self.doc_to_target, doc, "doc_to_target"), self.choices(doc)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and value not in choices:
            value = int(value)
        if isinstance(value, int):
            if not 0 <= value < len(choices):
                raise TaskError(f"{self.source}: gold index {value} is outside the {len(choices)} choices.")
            return value
        if value not in choices:
            raise TaskError(f"{self.source}: the target {value!r} is not one of the choices {choices}.")
        return choices.index(value)

    def target(self, doc: dict) -> str:
        if self.output_type == "multiple_choice":
            return self.choices(doc)[self.gold(doc)]
        return str(self._render(self.doc_to_target, doc, "doc_to_target"))

    # --------------------------------------------------------------- prompts
    def fewshot(self, index: int, k: int) -> list[dict]:
        """k examples for the document at `index`, drawn from (fewshot_seed, index): the same
        examples whatever --limit or batch order."""
        if k == 0:
            return []
        split = self.fewshot_split or self.test_split
        pool = self.docs[split]
        if split == self.test_split:
            pool = pool[:index] + pool[index + 1:]
        if len(pool) < k:
            raise TaskError(f"{self.source}: {k} few-shot examples asked but the '{split}' split has {len(pool)}.")
        return random.Random(f"{self.fewshot_seed}:{index}").sample(pool, k)

    def context(self, index: int, k: int) -> str:
        """description + k solved examples + this document's question."""
        doc = self.docs[self.test_split][index]
        shots = [self.text(d) + self.target_delimiter + self.target(d) for d in self.fewshot(index, k)]
        return self.description + "".join(s + self.fewshot_delimiter for s in shots) + self.text(doc)

    def extract(self, response: str) -> str:
        """generate_until: what exact_match compares (the filter's regex group, else the stripped text)."""
        if self.filter:
            m = re.search(self.filter["regex"], response)
            return m.group(self.filter.get("group", 0)).strip() if m else "[invalid]"
        return response.strip()


_KEYS = set(Task.__dataclass_fields__) - {"source", "docs"}


def _template(text: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(text)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve(name: str) -> tuple[Path, list[str]]:
    """'arithmetic', 'path/to/task.yaml', or either followed by ':key=value,key=value' overrides."""
    spec, _, rest = name.partition(":")
    overrides = [o for o in rest.split(",") if o] if rest else []
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise FileNotFoundError(f"no task file at {path}.")
        return path, overrides
    for folder in (BUILTIN_DIR, TEMPLATE_DIR):
        if (folder / f"{spec}.yaml").is_file():
            return folder / f"{spec}.yaml", overrides
    raise TaskError(f"unknown task {spec!r}: the built-in tasks are {', '.join(builtin_names())}; the templates "
                    f"are {', '.join(sorted(p.stem for p in TEMPLATE_DIR.glob('*.yaml')))}; or give a .yaml path.")


def load_task(name: str, tokenizer=None) -> Task:
    path, overrides = resolve(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TaskError(f"{path} is not valid YAML: {e}.") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path} must hold a mapping of task keys (task, output_type, dataset, ...).")
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq:
            raise TaskError(f"override {o!r} of {path.name} must read key=value (e.g. dataset.args.length=2048).")
        *path_to, last = key.split(".")
        target = raw
        for p in path_to:
            target = target.setdefault(p, {})
        target[last] = yaml.safe_load(value)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise TaskError(f"{path}: unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                        f"a task takes {', '.join(sorted(_KEYS))}.")
    for need in ("task", "output_type", "dataset"):
        if need not in raw:
            raise TaskError(f"{path}: the key {need!r} is missing.")
    if raw["output_type"] not in OUTPUT_TYPES:
        raise TaskError(f"{path}: output_type {raw['output_type']!r} is not one of {', '.join(OUTPUT_TYPES)}.")
    task = Task(**raw, source=str(path))
    if task.output_type == "multiple_choice" and (task.doc_to_choice is None or task.doc_to_target is None):
        raise TaskError(f"{path}: a multiple_choice task needs doc_to_choice and doc_to_target.")
    if task.output_type == "generate_until" and task.doc_to_target is None:
        raise TaskError(f"{path}: a generate_until task needs doc_to_target (the expected answer).")
    task.docs = _load_docs(task, path.parent, tokenizer)
    if task.test_split not in task.docs:
        raise TaskError(f"{path}: test_split {task.test_split!r} is not among the dataset's splits {sorted(task.docs)}.")
    if task.fewshot_split and task.fewshot_split not in task.docs:
        raise TaskError(f"{path}: fewshot_split {task.fewshot_split!r} is not among the splits {sorted(task.docs)}.")
    return task


def _load_docs(task: Task, root: Path, tokenizer) -> dict[str, list[dict]]:
    ds = dict(task.dataset)
    if "generator" in ds:
        from .builtin import generate
        extra = sorted(set(ds) - {"generator", "splits", "seed", "args"})
        if extra:
            raise TaskError(f"{task.source}: unknown dataset key(s) {extra} for a generator "
                            "(it takes generator, splits, seed, args).")
        return generate(ds["generator"], ds.get("splits", {"test": 100}), ds.get("seed", 0), ds.get("args", {}),
                        tokenizer)
    docs = {}
    for split, file in ds.items():
        path = Path(str(file)).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise FileNotFoundError(f"{task.source}: the '{split}' split's file {path} does not exist "
                                    f"(point dataset.{split} at your local JSONL copy).")
        docs[split] = read_jsonl(path)
    return docs


def read_jsonl(path: Path) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}, line {n}: not JSON ({e.msg}).") from None
        if not isinstance(doc, dict):
            raise TaskError(f"{path}, line {n}: each line must be one JSON object.")
        out.append(doc)
    if not out:
        raise TaskError(f"{path} holds no documents.")
    return out
