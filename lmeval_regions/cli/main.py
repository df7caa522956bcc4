"""``lmeval-regions``: the command line, generated from the configuration dataclasses.

Each subcommand is a :class:`Command`: a name, help text with examples, its *sections*
(``("model", ModelConfig)``, ``("corpus", CorpusConfig)``, its own options...) and a ``run``
function that receives the built sections. :mod:`.options` turns the sections into flags, so
every command that loads a model or reads a corpus takes the same flags with the same
defaults. ``--config FILE`` re-runs from a saved config; after a successful run the sections
are written next to the command's output (``<out>.config.yaml`` beside a file,
``<folder>/config.yaml`` in a folder), so any result can be repeated from its folder.

Before a command runs (:func:`check_files`), under the locks of all its outputs (a second
process writing one of them fails at once, naming it): inputs exist; no output is an input
(by any spelling or hard link), even with ``--overwrite``; an existing output is refused unless
``--overwrite`` (or the command resumes it); output folders are created and probed by writing
a file; the command's own input checks run (e.g. no importance file or language summed twice);
artefact inputs fit one model and the model's config (meta device, no weights).

Errors: bad input (:class:`~lmeval_regions.errors.RegionsError`, or an ``OSError`` on a path
the user gave) prints one line of at most ~600 characters and exits 2; Ctrl-C prints one line
and exits 130 (also while the parser imports the commands); ``--debug`` shows the traceback
instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmeval_regions import __version__
from lmeval_regions.artefacts import locked
from lmeval_regions.cli.options import (
    Section,
    add_sections,
    build_sections,
    read_config_file,
    save_run_config,
)
from lmeval_regions.errors import RegionsError
from lmeval_regions.models import ModelConfig, launcher

# Modules under lmeval_regions.cli.commands; each defines COMMANDS: list[Command].
GROUPS = ["core", "eval", "dims", "neurons", "studies", "data", "demo"]


@dataclass
class Files:
    """What a command reads and writes, checked (and the outputs locked) before it runs."""

    inputs: list[str] = field(default_factory=list)
    """Files read: they must exist, and are never written."""
    outputs: list[str] = field(default_factory=list)
    """Files written: never an input; an existing one is refused unless --overwrite."""
    folders: list[str] = field(default_factory=list)
    """Folders written into (reports, caches): they may exist, a second run resumes in them."""
    resumable: list[str] = field(default_factory=list)
    """Outputs the command itself reuses when they were made from the same inputs."""
    model: ModelConfig | None = None
    """The model the artefact inputs must fit (checked from its config, before any weight)."""
    checks: list[Callable[[], None]] = field(default_factory=list)
    """More checks of the inputs (metadata only), run after they are found to exist: e.g. that
    importance files to be summed hold no file or language twice."""


@dataclass
class Command:
    """One subcommand."""

    name: str
    help: str
    description: str
    """Shown by ``--help``: what it does, then ``example:`` lines."""
    sections: list[Section]
    run: Callable[[dict[str, Any]], "int | None"]
    output: Callable[[dict[str, Any]], "Path | None"] | None = None
    """The path of the run's config file (beside an output file, or inside an output folder)."""
    files: Callable[[dict[str, Any]], Files] | None = None
    """What the command reads and writes (see :class:`Files`)."""
    parallel: bool = False
    """Runs data parallel under ``accelerate launch`` / ``torchrun`` (rank 0 writes); other
    commands refuse to run in several processes."""


@dataclass
class RunOptions:
    """Flags about this invocation, not about the result (never saved in a config)."""

    overwrite: bool = False
    debug: bool = False
    quiet: bool = False


def commands() -> list[Command]:
    out: list[Command] = []
    for group in GROUPS:
        out += importlib.import_module(f"lmeval_regions.cli.commands.{group}").COMMANDS
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmeval-regions",
        description="Find, inspect, ablate and protect the linguistic regions of LLMs.\n"
                    "Flow: importance -> extract (regions) -> lm_eval --model hf-regions.\n"
                    "Every subcommand takes --config FILE (a saved run config) and --debug.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in commands():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML/JSON run config (as written beside every output); flags "
                             "given here override its values")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
        sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars")
        sp.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                        help="replace outputs that already exist (never an input)")
        add_sections(sp, cmd.sections)
        sp.set_defaults(_command=cmd)
    return p


def run_command(cmd: Command, ns: argparse.Namespace) -> int:
    """Build the sections (config file, then flags), run, and save the config beside the output."""
    given = {k: v for k, v in vars(ns).items() if "." in k}  # section.field flags only
    file_doc = None
    if "config" in vars(ns):
        file_doc = read_config_file(ns.config)
        named = file_doc.get("command", cmd.name)
        if named != cmd.name:
            raise RegionsError(f"--config '{ns.config}' is a config of '{named}', not of "
                               f"'{cmd.name}'; run `lmeval-regions {named} --config {ns.config}`")
    sections = build_sections(cmd.sections, argparse.Namespace(**given), file_doc,
                              source=f"--config {ns.config}" if file_doc is not None else "")
    run = RunOptions(**{k: bool(getattr(ns, k, False)) for k in ("overwrite", "debug", "quiet")})
    files = cmd.files(sections) if cmd.files else Files()
    target = cmd.output(sections) if cmd.output else None
    outputs = [*files.outputs, *([str(target)] if target is not None else [])]
    rank, world, _ = launcher()
    if world > 1 and not cmd.parallel:
        raise RegionsError(f"'{cmd.name}' runs in one process, but this is one of {world} "
                           "launched processes (accelerate launch / torchrun): run it without "
                           "the launcher (only importance and activations run data parallel)")
    # Lock first, then check: a writer that finished between our check and our lock would
    # otherwise be overwritten without --overwrite. Launched ranks: rank 0 holds the locks and
    # writes; the others compute their share. The artefacts are locked before the run config
    # beside them (one order in every process, so no deadlock), so a second writer is told
    # the name of the artefact, not of its config.
    artefacts = [*files.outputs, *files.folders]
    resolved = {Path(a).resolve() for a in artefacts}
    beside = [] if target is None or Path(target).resolve() in resolved else [target]
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(locked(artefacts))
            stack.enter_context(locked(beside))
        check_files(files, outputs, run.overwrite)
        sections["run"] = run
        code = cmd.run(sections)
        del sections["run"]
        if target is not None and rank == 0:
            saved = save_run_config(target, cmd.name, sections)
            print(f"config: {saved}")
    return int(code or 0)


def check_files(files: Files, outputs: list[str], overwrite: bool) -> None:
    """Before any work: inputs exist and fit one model (and the model, from its config);
    outputs are not inputs, do not exist (unless --overwrite or resumable) and can be
    written."""
    from lmeval_regions.artefacts import check_same_model, read_metadata

    inputs = {}
    for p in files.inputs:
        if not Path(p).is_file():
            raise RegionsError(f"input '{p}' does not exist (or is not a file)")
        inputs[_identity(p)] = p
    for p in [*outputs, *files.folders]:
        if _identity(p) in inputs:
            raise RegionsError(f"output '{p}' is also an input of this command "
                               f"('{inputs[_identity(p)]}'); writing it would destroy the input: "
                               "give another output path")
    for check in files.checks:
        check()
    for p in outputs:
        if Path(p).is_dir():
            raise RegionsError(f"output '{p}' is a folder; expected the path of a file")
        if Path(p).exists() and not overwrite and p not in files.resumable \
                and not str(p).endswith(".config.yaml") and Path(p).name != "config.yaml":
            raise RegionsError(f"output '{p}' already exists: give another path, or pass "
                               "--overwrite to replace it")
    for p in dict.fromkeys([*[str(Path(o).parent) for o in outputs], *files.folders]):
        check_writable(Path(p))
    artefacts = [p for p in files.inputs if p.endswith(".safetensors")]
    if len(artefacts) > 1:
        check_same_model(artefacts)
    if artefacts and files.model is not None:
        from lmeval_regions.artefacts import check_fingerprint
        from lmeval_regions.models import meta_model

        skeleton = meta_model(files.model)
        for p in artefacts:
            doc = read_metadata(p)
            if doc.get("model") and doc.get("kind") in ("region", "importance"):
                from safetensors import safe_open

                with safe_open(p, framework="pt") as f:
                    names = list(f.keys())
                check_fingerprint(doc["model"], skeleton, what=f"'{p}'", names=names)


def _identity(path: str | os.PathLike) -> Any:
    """What makes two paths one file: device and inode when it exists (hard links, symlinks,
    ``./x`` and ``x``), else the resolved path."""
    p = Path(path)
    try:
        st = p.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        return p.resolve()


def check_writable(folder: Path) -> None:
    """Create ``folder`` (and parents) and check a file can be created in it, by creating and
    removing one: permission bits alone say nothing on a read-only file system or to root."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RegionsError(f"cannot create the output folder '{folder}': "
                           f"{e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmeval-regions-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RegionsError(f"cannot write into the output folder '{folder}': "
                           f"{e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0; 2 on an error, 130 on Ctrl-C)."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    name = "lmeval-regions"
    if "--quiet" in args:  # before any import of tqdm: it reads TQDM_* when it is imported
        os.environ["TQDM_DISABLE"] = "1"
    try:  # also around the parser: building it imports every command's modules (seconds)
        ns = build_parser().parse_args(args)
        cmd: Command = ns._command
        name = f"lmeval-regions {cmd.name}"
        if argv is None:
            # A command-line process: what is imported by now (torch alone is ~10^5 objects)
            # lives until exit; frozen, every later collection skips it (~0.2-0.6 s of a
            # 7B-scale extraction went to collections traversing it). Not for calls from
            # Python (tests, notebooks), whose objects are theirs to collect.
            gc.freeze()
        return run_command(cmd, ns)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{name}: interrupted (outputs are written atomically: finished files are "
              "complete, unfinished ones were not written)", file=sys.stderr)
        return 130
    except (RegionsError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 2


MAX_MESSAGE = 600
"""Characters of an error message shown (a corrupt file's header can be kilobytes)."""


def one_line(e: BaseException) -> str:
    """A short message: OSErrors as 'strerror: filename', others as their text; one line,
    capped at :data:`MAX_MESSAGE` characters."""
    if isinstance(e, OSError) and not isinstance(e, RegionsError) and e.strerror:
        text = f"{e.strerror}: '{e.filename}'" if e.filename else e.strerror
    else:
        text = str(e)
    text = " ".join(text.split())
    if len(text) <= MAX_MESSAGE:
        return text
    # keep both ends: the file is named first, what was expected usually last
    head, tail = text[:MAX_MESSAGE // 2], text[-MAX_MESSAGE // 3:]
    return (f"{head} ... [{len(text) - len(head) - len(tail)} characters cut; --debug shows "
            f"everything] ... {tail}")


if __name__ == "__main__":
    sys.exit(main())
