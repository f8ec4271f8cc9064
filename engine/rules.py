"""The rule an option's value must meet, and the one-line refusal of a value that does not.

A `Rule` is the type a value must have, a predicate, what is wrong when the predicate fails, and
what is accepted instead, in words. `check_option(flag, value, rules)` applies one rule to one
value, so options that arrive some other way than the command line (a cohort member's JSON,
say) meet the same rules as flags."""
import math
from collections import namedtuple

from engine.errors import UserError

Kind = namedtuple('Kind', 'types name')
# bool is an int to Python, but `--alpha true` in JSON is a mistake, not the number 1.
NUMBER = Kind((int, float), 'a number')
INTEGER = Kind((int,), 'a whole number')
OPTIONAL_INTEGER = Kind((int, type(None)), 'a whole number')
OPTIONAL_NUMBER = Kind((int, float, type(None)), 'a number')
TEXT = Kind((str,), 'text')
SWITCH = Kind((bool,), 'true or false')

Rule = namedtuple('Rule', 'kind test problem accepted')


def choice(values):
    return Rule(TEXT, lambda v: v in values, 'is not one of the choices', f'use one of {", ".join(values)}')


ANY_TEXT = Rule(TEXT, lambda v: True, '', '')
SWITCH_RULE = Rule(SWITCH, lambda v: True, '', '')
LOSS_WEIGHT = Rule(NUMBER, lambda v: v >= 0, 'is negative', 'a loss weight is 0 (off) or positive')


def shown(value):
    if isinstance(value, str):
        return f' {value!r}' if value else ''
    return f' {value}'


def check_option(flag, value, rules):
    """Returns `value` if the rule of --flag accepts it; otherwise raises a one-line UserError
    naming the flag, the value and what is accepted."""
    if flag not in rules:
        raise UserError(f'{flag!r} is not an option here; known options: {", ".join(sorted(rules))}')
    rule = rules[flag]
    if not isinstance(value, rule.kind.types) or (isinstance(value, bool) and bool not in rule.kind.types):
        problem = f'is not {rule.kind.name}'
    elif isinstance(value, float) and not math.isfinite(value):
        problem = 'is not a finite number'
    elif not rule.test(value):
        problem = rule.problem
    else:
        return value
    raise UserError(f'--{flag}{shown(value)} {problem}; {rule.accepted}')
