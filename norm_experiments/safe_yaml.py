"""Bounded YAML from places the project does not control: a `net=` network config, a MONAI bundle's
inference.yaml, a run folder's .hydra/overrides.yaml and run_config.yaml, a sweep's multirun.yaml.

YAML can say a lot in few bytes: an anchor repeated nine times, nine levels deep (`b: [*a, *a, ...]`), is
a few hundred bytes that expand to hundreds of millions of values when the document is built, and PyYAML's composer recurses once per
level of nesting. So the document's events are first counted, as the parser yields them and before anything is
built: every value an alias stands for is counted as often as it is repeated, an alias to a node that is still
open (a document that contains itself) is refused, and so is nesting deeper than a limit. Only a document within
the limits is then built, with OmegaConf's own YAML rules (floats such as 1e-3, no dates, duplicate keys
refused), so that callers read the same values OmegaConf.create(text) gave them. Torch-free: the report imports
it.
"""

from __future__ import annotations

from typing import Any

import yaml
from omegaconf._utils import get_yaml_loader

from norm_experiments.safe_io import UnsafeFile

# Far above what the project's YAML holds (a sweep's multirun.yaml: about 600 values, a MONAI bundle's
# inference.yaml: a few hundred, a network config: tens), far below what takes long to build.
MAX_NODES = 50_000
MAX_DEPTH = 64  # our configs nest 6 deep, bundles 5

_OMEGACONF_LOADER = get_yaml_loader()

try:  # libyaml's parser: counting the events of 4 MiB takes milliseconds, not seconds
    from yaml.cyaml import CParser, CSafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    CParser = CSafeLoader = None

if CParser is not None:

    class _Loader(CParser, _OMEGACONF_LOADER):  # type: ignore[misc, valid-type]
        """OmegaConf's loader (its resolvers, constructors and duplicate-key check) on libyaml's parser."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _PARSER: type = CSafeLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _Loader = _OMEGACONF_LOADER
    _PARSER = yaml.SafeLoader

_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def load(text: str, where: object, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> Any:
    """The YAML document in `text` as plain Python data (dicts, lists, str, int, float, bool; None for an empty
    document), or UnsafeFile with one line that names `where` (a file, or a key such as net=): a document that
    expands to more than max_nodes values (aliases counted as often as they are used), nests deeper than
    max_depth, has an alias to itself, or is no valid YAML."""
    try:
        count(text, max_nodes, max_depth)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - OmegaConf's SafeLoader subclass
    except _Refused as err:
        raise UnsafeFile(f"{where}: refused, {err}") from None
    except yaml.YAMLError as err:
        raise UnsafeFile(f"{where}: not valid YAML ({_yaml_reason(err)})") from None
    except ValueError as err:  # int() of a number with more than 4,300 digits
        reason = "a number with too many digits" if "digits" in str(err) else str(err).splitlines()[0][:120]
        raise UnsafeFile(f"{where}: refused, {reason}") from None
    except RecursionError:  # not reached below the depth limit; kept so that no limit change brings it back
        raise UnsafeFile(f"{where}: refused, nested too deeply") from None


class _Refused(Exception):
    pass


def count(text: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> int:
    """The number of values the document in `text` expands to, counted from the parser's events before anything
    is built; raises _Refused past max_nodes or max_depth, or at an alias to a node not yet closed."""
    sizes: dict[str, int] = {}  # anchor -> the values its node expands to
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, values counted when it opened)
    seen = 0  # values so far, each alias counted as the values it stands for
    for event in yaml.parse(text, Loader=_PARSER):
        if isinstance(event, _OPEN):
            if len(open_nodes) >= max_depth:
                raise _Refused(f"nested more than {max_depth} levels deep (line {event.start_mark.line + 1})")
            open_nodes.append((event.anchor, seen))
            seen += 1
        elif isinstance(event, _CLOSE):
            anchor, before = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = seen - before
        elif isinstance(event, yaml.ScalarEvent):
            seen += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                raise _Refused(
                    f"alias *{event.anchor} (line {event.start_mark.line + 1}) refers to no complete node "
                    "(undefined, or a node that contains the alias)"
                )
            seen += sizes[event.anchor]
        if seen > max_nodes:
            raise _Refused(
                f"it expands to more than {max_nodes} values (aliases counted each time they are used; "
                f"line {event.start_mark.line + 1})"
            )
    return seen


def _yaml_reason(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    mark = getattr(err, "problem_mark", None)
    return (
        f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)
    )
