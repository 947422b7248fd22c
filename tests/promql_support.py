"""Just enough PromQL to tell which series a dashboard query returns against one scrape
(no values: rate() of a counter present is taken as present). Covers what
deploy/grafana/mcsproxy-dashboard.json uses: selectors with =, !=, =~, !~ (Grafana's
$service taken as .*), rate/increase over a range, sum/avg/min/max [by (...)],
histogram_quantile, a number times a vector, and the binary + and `or` with PromQL's
matching on the full label set. No tests here."""

from __future__ import annotations

import re

Labels = frozenset[tuple[str, str]]
Samples = dict[str, list[tuple[dict[str, str], float]]]

TOKEN_RE = re.compile(r'\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_:][\w:]*)|("(?:[^"\\]|\\.)*")'
                      r'|(\[[^\]]*\])|(=~|!~|!=|=|[(){},*+]))')


def evaluate(expr: str, samples: Samples) -> list[Labels]:
    """The label sets of the series `expr` returns."""
    return Query(expr, samples).run()


class Query:
    def __init__(self, expr: str, samples: Samples) -> None:
        self.samples = samples
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        expr = expr.replace("$service", ".*")
        while pos < len(expr.rstrip()):
            m = TOKEN_RE.match(expr, pos)
            assert m and m.end() > pos, f"cannot read {expr[pos:]!r}"
            kind = ("num", "name", "str", "range", "op")[m.lastindex - 1]  # type: ignore[operator]
            self.tokens.append((kind, m.group(m.lastindex)))  # type: ignore[arg-type]
            pos = m.end()
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self, want: str | None = None) -> str:
        text = self.tokens[self.i][1]
        assert want is None or text == want, (want, text, self.tokens)
        self.i += 1
        return text

    def run(self) -> list[Labels]:
        out = self.expr()
        assert self.i == len(self.tokens), self.tokens[self.i:]
        return out

    def expr(self) -> list[Labels]:
        left = self.term()
        while self.peek() in ("+", "or"):
            op = self.take()
            right = self.term()
            if op == "+":  # one-to-one on every label: only sets on both sides survive
                left = [s for s in left if s in right]
            else:
                left = left + [s for s in right if s not in left]
        return left

    def term(self) -> list[Labels]:
        kind, text = self.tokens[self.i]
        if kind == "num":
            self.take()
            self.take("*")
            return self.term()
        if text == "(":
            self.take()
            out = self.expr()
            self.take(")")
            return out
        if text in ("sum", "avg", "min", "max"):
            self.take()
            by: list[str] | None = None
            if self.peek() == "by":
                self.take()
                self.take("(")
                by = []
                while self.peek() != ")":
                    by.append(self.take())
                    if self.peek() == ",":
                        self.take()
                self.take(")")
            self.take("(")
            inner = self.expr()
            self.take(")")
            if by is None:
                return [frozenset()] if inner else []
            return sorted({frozenset((k, v) for k, v in s if k in by) for s in inner}, key=sorted)
        if text in ("rate", "increase"):
            self.take()
            self.take("(")
            out = self.selector()
            assert self.tokens[self.i][0] == "range"
            self.take()
            self.take(")")
            return out
        if text == "histogram_quantile":
            self.take()
            self.take("(")
            self.take()
            self.take(",")
            inner = self.expr()
            self.take(")")
            assert all(any(k == "le" for k, _ in s) for s in inner), "no le to bucket by"
            return sorted({frozenset((k, v) for k, v in s if k != "le") for s in inner},
                          key=sorted)
        return self.selector()

    def selector(self) -> list[Labels]:
        name = self.take()
        matchers: list[tuple[str, str, str]] = []
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label, op, value = self.take(), self.take(), self.take()
                matchers.append((label, op, value[1:-1]))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        out = []
        for labels, _ in self.samples.get(name, []):
            if all(_matches(labels.get(k, ""), op, v) for k, op, v in matchers):
                out.append(frozenset(labels.items()))
        return out


def _matches(actual: str, op: str, want: str) -> bool:
    if op == "=":
        return actual == want
    if op == "!=":
        return actual != want
    hit = re.fullmatch(want, actual) is not None
    return hit if op == "=~" else not hit
