"""Written digits in several languages: ``num2words`` number words inside phrase templates.

A :class:`Template` is one *phrasing concept* ("the number X", "A plus B") written once per
language, plus the operands that make it denote a digit 0-9 ("three plus four" -> 7,
"sechzehn geteilt durch zwei" -> 8). Splits are made by template, across languages, so a test
item's phrasing was never seen in training in *any* language (the task is to read the digit and
the language, not to memorise sentence frames).

Each template belongs to a *family*: what it computes and the words that carry it: how the
operands are written and, for arithmetic, the word that names the operation (``identity/word``,
``minus/word`` for "A minus B" and "what is A minus B?", ``minus/take`` for "take B from A").
Only templates whose family keeps another member in training are held out for val and test: "what
is seventy-two divided by nine?" is tested after training on "seventy-two divided by nine" (and on
"what is three plus four?"), a new frame around words the model has learnt. A phrasing whose
meaning no training phrase carries ("nine minus four" after only "take four from nine": the model
would have to guess what the never-seen "minus" means; "the number after X" with no successor
phrase in training) would test guessing, not reading; such singleton families always train.

The templates of one family share their operand fillings per (language, digit): a held-out
arithmetic phrase asks a fact that training taught in another frame, so the test measures reading
an unseen phrasing, not extrapolating arithmetic to unseen operand pairs.

Labels stay clean by construction: an arithmetic result is always 0-9, and a string that could
carry two labels (English and French "six", Spanish and Italian "uno") is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from num2words import num2words

from workbench.modalities import LANGUAGES

Operands = Callable[[int], list[dict[str, int]]]


@dataclass(frozen=True)
class Template:
    name: str
    kind: str  # word (one item per digit) | arith (operands balanced over digits) | sum (unbalanced)
    family: str  # operation/notation: held out only while another template of the family trains
    phrases: dict[str, str]  # language -> format string over {x} {xn} {a} {an} {b} {bn}
    operands: Operands  # digit -> the operand fillings that make the phrase mean that digit


def _one(shift: int = 0, factor: int = 1) -> Operands:
    """``x = digit * factor + shift`` (e.g. "the number before X": shift=+1), if it is >= 0."""
    return lambda d: [{"x": d * factor + shift}] if d * factor + shift >= 0 else []


def _plus(d: int) -> list[dict[str, int]]:
    return [{"a": a, "b": d - a} for a in range(d + 1)]


def _minus(d: int) -> list[dict[str, int]]:
    return [{"a": d + b, "b": b} for b in range(10)]


def _times(d: int) -> list[dict[str, int]]:
    return [{"a": a, "b": b} for a in range(10) for b in range(10) if a * b == d]


def _divided(d: int) -> list[dict[str, int]]:
    return [{"a": d * b, "b": b} for b in range(1, 10)]


def _t(
    name: str, kind: str, family: str, operands: Operands, en: str, de: str, fr: str, es: str, it: str
) -> Template:
    return Template(name, kind, family, {"en": en, "de": de, "fr": fr, "es": es, "it": it}, operands)


TEMPLATES: tuple[Template, ...] = (
    _t("bare", "word", "identity/word", _one(), "{x}", "{x}", "{x}", "{x}", "{x}"),
    _t("the_number", "word", "identity/word", _one(),
       "the number {x}", "die Zahl {x}", "le nombre {x}", "el número {x}", "il numero {x}"),
    _t("the_number_numeral", "word", "identity/numeral", _one(),
       "the number {xn}", "die Zahl {xn}", "le nombre {xn}", "el número {xn}", "il numero {xn}"),
    _t("the_digit", "word", "identity/word", _one(),
       "the digit {x}", "die Ziffer {x}", "le chiffre {x}", "el dígito {x}", "la cifra {x}"),
    _t("write", "word", "identity/word", _one(),
       "write {x}", "schreib {x}", "écris {x}", "escribe {x}", "scrivi {x}"),
    _t("say_please", "word", "identity/word", _one(), "please say {x}", "sag bitte {x}",
       "dis {x}, s'il te plaît", "di {x}, por favor", "di' {x}, per favore"),
    _t("room", "word", "identity/numeral", _one(), "room number {xn}", "Zimmer Nummer {xn}",
       "chambre numéro {xn}", "habitación número {xn}", "camera numero {xn}"),
    _t("answer", "word", "identity/word", _one(), "the answer is {x}", "die Antwort ist {x}",
       "la réponse est {x}", "la respuesta es {x}", "la risposta è {x}"),
    _t("before", "word", "predecessor/word", _one(shift=1), "the number before {x}", "die Zahl vor {x}",
       "le nombre avant {x}", "el número antes de {x}", "il numero prima di {x}"),
    _t("after", "word", "successor/word", _one(shift=-1), "the number after {x}", "die Zahl nach {x}",
       "le nombre après {x}", "el número después de {x}", "il numero dopo {x}"),
    _t("half", "word", "half/word", _one(factor=2), "half of {x}", "die Hälfte von {x}",
       "la moitié de {x}", "la mitad de {x}", "la metà di {x}"),
    _t("spelled", "word", "identity/both", _one(), "{xn} is written {x}", "{xn} schreibt man {x}",
       "{xn} s'écrit {x}", "{xn} se escribe {x}", "{xn} si scrive {x}"),
    _t("plus", "sum", "plus/word", _plus,
       "{a} plus {b}", "{a} plus {b}", "{a} plus {b}", "{a} más {b}", "{a} più {b}"),
    _t("minus", "arith", "minus/word", _minus,
       "{a} minus {b}", "{a} minus {b}", "{a} moins {b}", "{a} menos {b}", "{a} meno {b}"),
    _t("what_minus", "arith", "minus/word", _minus, "what is {a} minus {b}?", "was ist {a} minus {b}?",
       "combien font {a} moins {b} ?", "¿cuánto es {a} menos {b}?", "quanto fa {a} meno {b}?"),
    _t("times", "sum", "times/word", _times,
       "{a} times {b}", "{a} mal {b}", "{a} fois {b}", "{a} por {b}", "{a} per {b}"),
    _t("divided", "arith", "divide/word", _divided, "{a} divided by {b}", "{a} geteilt durch {b}",
       "{a} divisé par {b}", "{a} dividido entre {b}", "{a} diviso {b}"),
    _t("what_divided", "arith", "divide/word", _divided, "what is {a} divided by {b}?",
       "was ist {a} geteilt durch {b}?", "combien font {a} divisé par {b} ?",
       "¿cuánto es {a} dividido entre {b}?", "quanto fa {a} diviso {b}?"),
    _t("what_plus", "sum", "plus/word", _plus, "what is {a} plus {b}?", "was ist {a} plus {b}?",
       "combien font {a} plus {b} ?", "¿cuánto es {a} más {b}?", "quanto fa {a} più {b}?"),
    _t("add_numerals", "sum", "plus/numeral", _plus, "add {an} and {bn}", "addiere {an} und {bn}",
       "additionne {an} et {bn}", "suma {an} y {bn}", "somma {an} e {bn}"),
    _t("take", "arith", "minus/take", _minus, "take {b} from {a}", "zieh {b} von {a} ab",
       "ôte {b} de {a}", "resta {b} de {a}", "togli {b} da {a}"),
    _t("multiplied", "sum", "times/word", _times, "{a} multiplied by {b}", "{a} multipliziert mit {b}",
       "{a} multiplié par {b}", "{a} multiplicado por {b}", "{a} moltiplicato per {b}"),
    _t("split_parts", "arith", "divide/split", _divided, "split {a} into {b} equal parts",
       "teile {a} in {b} gleiche Teile", "partage {a} en {b} parts égales",
       "reparte {a} en {b} partes iguales", "dividi {a} in {b} parti uguali"),
)  # fmt: skip

# Templates per split, per kind: (train, val, test). Every split sees word and arithmetic phrasings;
# sums and products (few ways to make 0 or 1, many to make 9) only train, so that val and test
# stay balanced over digits.
SPLIT_TEMPLATES = {"word": (8, 2, 2), "arith": (4, 1, 1), "sum": (5, 0, 0)}
MAX_PER_DIGIT = 6  # operand fillings kept per (template, language, digit) at scale 1


def word(n: int, language: str) -> str:
    """The number word of ``n`` in ``language`` (num2words), e.g. ``word(7, "de") == "sieben"``."""
    return num2words(n, lang=language)


def render(template: Template, language: str, fill: dict[str, int]) -> str:
    values = {}
    for key, n in fill.items():
        values[key], values[key + "n"] = word(n, language), str(n)
    return template.phrases[language].format(**values)


def split_templates(seed: int) -> dict[str, list[str]]:
    """Template names per split (train/val/test), a seeded choice within each kind.

    In a seeded order, a template goes to test, then val, while that split still needs one of its
    kind *and* its family keeps at least one other template in training; the rest train.
    """
    rng = np.random.default_rng([seed, 7])
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for kind, (n_train, n_val, n_test) in SPLIT_TEMPLATES.items():
        members = [t for t in TEMPLATES if t.kind == kind]
        assert len(members) == n_train + n_val + n_test, f"SPLIT_TEMPLATES[{kind!r}] must use all templates"
        order = [members[i] for i in rng.permutation(len(members))]
        training = {t.family: sum(u.family == t.family for u in TEMPLATES) for t in members}
        held = {"test": [], "val": []}
        for t in order:
            for split, wanted in (("test", n_test), ("val", n_val)):
                if len(held[split]) < wanted and training[t.family] > 1:
                    held[split].append(t.name)
                    training[t.family] -= 1
                    break
            else:
                out["train"].append(t.name)
        for split, wanted in (("test", n_test), ("val", n_val)):
            assert len(held[split]) == wanted, f"too few {kind} templates with a training sibling for {split}"
            out[split] += held[split]
    return out


def build_texts(seed: int, scale: float = 1.0, languages: tuple[str, ...] = LANGUAGES) -> list[dict]:
    """Every text item: ``{"text", "digit", "language", "template", "split"}``, deterministic in ``seed``.

    ``scale`` < 1 keeps fewer operand fillings per digit (tests); every template is always present.
    """
    cap = max(1, round(MAX_PER_DIGIT * scale))
    split_of = {name: split for split, names in split_templates(seed).items() for name in names}
    families = sorted({t.family for t in TEMPLATES})
    items = []
    for template in TEMPLATES:
        fi = families.index(template.family)  # one family, one choice of fillings (module docstring)
        for li, language in enumerate(languages):
            for digit in range(10):
                fills = template.operands(digit)
                if len(fills) > cap:
                    rng = np.random.default_rng([seed, 11, fi, li, digit])
                    fills = [fills[i] for i in sorted(rng.choice(len(fills), cap, replace=False))]
                for fill in fills:
                    text = render(template, language, fill)
                    items.append({"text": text, "digit": digit, "language": language,
                                  "template": template.name, "split": split_of[template.name]})  # fmt: skip
    # A string that carries two labels (en/fr "six") cannot be labelled: drop every copy of it.
    labels: dict[str, set] = {}
    for it in items:
        labels.setdefault(it["text"].lower(), set()).add((it["digit"], it["language"]))
    seen: set[str] = set()
    out = []
    for it in items:
        key = it["text"].lower()
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            out.append(it)
    return out
