"""Offline checks of the deployment files under cluster/ (README.md, "Running on a cluster").

Every check walks all the files: each YAML document (with the YAML embedded in runtimeEnvYAML parsed as well) and
each Dockerfile's RUN steps, so a new file is covered without new code. Commands are found wherever a string holds
one and checked with the real parsers: kd_tune.cli.parser() for kd-tune, Ray's click CLI for ray. Nothing here
talks to Kubernetes, AWS or a Ray cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import posixpath
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement

from kd_tune.cli import parser
from kd_tune.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO / "cluster"
SEARCH_SPACE_DIR = REPO / "kd_tune" / "search_spaces"  # the built-in spaces (./search_spaces links here)
README_SECTION = "Running on a cluster"
PLACEHOLDER = "REPLACE_ME"
TORCH_PAIR = ("torch", "torchaudio")

# A key or variable whose value would be a credential; names ending like a reference (secretName, secretKeyRef,
# RAY_AUTH_TOKEN_PATH, KD_TUNE_SIGNING_KEY_FILE) say where a secret is, not what it is.
SECRET_NAME = re.compile(r"secret|token|passw|signing_?key|access_?key|private_?key|credential|api_?key", re.I)
REFERENCE_NAME = re.compile(r"(name|ref|path|file)$", re.I)
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "KD_TUNE_SIGNING_KEY",
              "RAY_AUTH_TOKEN"}
LEAKED = {  # patterns that are credentials wherever they appear, comments included
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),
}
ASSIGNMENT_IN_TEXT = re.compile(r"(?<![\w$.-])([A-Za-z_]\w*)=(\"[^\"]*\"|'[^']*'|[^\s;&|]*)")

# Shell tokens, as shlex(punctuation_chars=True) returns them.
CONTROL_OPERATOR = re.compile(r"[;&|()]+")
REDIRECT = re.compile(r"[<>]+&?")
ASSIGNMENT = re.compile(r"([A-Za-z_]\w*)=(.*)", re.S)
PREFIX_WORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}", "exec", "time",
                "nohup", "sudo", "env"}
COMMAND_HINT = re.compile(r"(^|[\s;&|/])(kd-tune|ray|pip3?|python3?(\.\d+)?)(\s|$)")
PYTHON = re.compile(r"python3?(\.\d+)?")
PIP_OPTIONS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                          "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--python-version",
                          "--platform", "--cache-dir", "--log", "--progress-bar"}


# ---------------------------------------------------------------- the files


@dataclass(frozen=True)
class Document:
    file: Path
    index: int
    tree: object

    @property
    def label(self) -> str:
        return f"{self.file.relative_to(REPO)}#{self.index}"


@dataclass(frozen=True)
class Command:
    """One simple shell command found in a file."""
    group: str  # the document (or Dockerfile) it came from; checks that compare commands stay within one
    path: tuple  # where in the document: YAML keys and indices, or ("RUN", n)
    env: dict
    argv: tuple

    @property
    def where(self) -> str:
        return f"{self.group} {'.'.join(map(str, self.path))}"


def yaml_files() -> list[Path]:
    return sorted(CLUSTER_DIR.rglob("*.yaml")) + sorted(CLUSTER_DIR.rglob("*.yml"))


def dockerfiles() -> list[Path]:
    return sorted(CLUSTER_DIR.rglob("Dockerfile*"))


@functools.cache
def documents() -> tuple[Document, ...]:
    return tuple(Document(f, i, tree) for f in yaml_files()
                 for i, tree in enumerate(yaml.safe_load_all(f.read_text())) if tree is not None)


def walk(node, path: tuple = ()):
    """(path, value) for every node of a YAML tree in document order; strings under *YAML keys are parsed."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and str(key).endswith("YAML"):
                value = yaml.safe_load(value)
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*path, i))


def dockerfile_steps(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    steps = []
    for line in text.splitlines():
        instruction, _, arguments = line.strip().partition(" ")
        if instruction:
            steps.append((instruction.upper(), arguments.strip()))
    return steps


def dockerfile_images(path: Path) -> list[str]:
    """The FROM images, with ARG defaults substituted."""
    args, images = {}, []
    for instruction, value in dockerfile_steps(path):
        if instruction == "ARG" and "=" in value:
            name, _, default = value.partition("=")
            args[name.strip()] = default.strip()
        elif instruction == "FROM":
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), value.split()[0]))
    return images


# ---------------------------------------------------------------- commands


def shell_commands(script: str, *, group: str, path: tuple) -> list[Command]:
    """The simple commands of a shell script (env assignments and keywords stripped), quoted scripts included.

    A single word is a name or a path (metadata.name: kd-tune), not a script.
    """
    if not COMMAND_HINT.search(script) or not any(c.isspace() for c in script.strip()):
        return []
    lexer = shlex.shlex(script.replace("\\\n", " ").replace("\n", " ; "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as e:
        if "kd-tune" in script or "pip" in script:
            raise ValueError(f"{group} {path}: not a shell command line ({e}): {script!r}") from None
        return []  # prose that merely mentions a program
    found, exported, words = [], {}, []
    for token in [*tokens, ";"]:
        if not CONTROL_OPERATOR.fullmatch(token):
            words.append(token)
            continue
        env, argv = split_simple_command(words)
        if argv[:1] == ["export"]:
            exported |= dict(ASSIGNMENT.fullmatch(w).groups() for w in argv[1:] if ASSIGNMENT.fullmatch(w))
        elif argv:
            found.append(Command(group, path, {**exported, **env}, tuple(argv)))
        for word in words:  # a quoted script, e.g. `bash -c "kd-tune ..."`
            if any(c.isspace() for c in word):
                found += shell_commands(word, group=group, path=path)
        words = []
    return found


def split_simple_command(words: list[str]) -> tuple[dict, list[str]]:
    env, argv, skip = {}, [], False
    for i, word in enumerate(words):
        next_is_redirect = i + 1 < len(words) and REDIRECT.fullmatch(words[i + 1])
        if skip or (word.isdigit() and next_is_redirect):  # `2>&1`: the fd, the operator, the target
            skip = False
        elif REDIRECT.fullmatch(word):
            skip = True
        elif not argv and word in PREFIX_WORDS:
            continue
        elif not argv and ASSIGNMENT.fullmatch(word):
            name, value = ASSIGNMENT.fullmatch(word).groups()
            env[name] = value
        else:
            argv.append(word)
    return env, argv


@functools.cache
def commands() -> tuple[Command, ...]:
    found = []
    for doc in documents():
        for path, value in walk(doc.tree):
            if isinstance(value, str):
                found += shell_commands(value, group=doc.label, path=path)
            elif is_exec_form(value):  # a container's command: ["kd-tune", "sweep", ...]
                found.append(Command(doc.label, path, {}, tuple(value)))
    for file in dockerfiles():
        runs = [value for instruction, value in dockerfile_steps(file) if instruction == "RUN"]
        for i, run in enumerate(runs):
            found += shell_commands(run, group=str(file.relative_to(REPO)), path=("RUN", i))
    return tuple(found)


def is_exec_form(value) -> bool:
    return (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
            and not any(c.isspace() for c in value[0]) and program(value)[0] in ("kd-tune", "ray", "pip"))


def program(argv) -> tuple[str, list[str]]:
    """The program a command runs and its arguments; `python -m X` counts as X."""
    name, args = PurePosixPath(argv[0]).name, list(argv[1:])
    if PYTHON.fullmatch(name) and args[:1] == ["-m"] and len(args) > 1:
        name, args = {"kd_tune": "kd-tune"}.get(args[1], args[1]), args[2:]
    return ("pip" if re.fullmatch(r"pip3?(\.\d+)?", name) else name), args


def calls(name: str) -> list[tuple[Command, list[str]]]:
    return [(cmd, args) for cmd in commands() for prog, args in [program(cmd.argv)] if prog == name]


# ---------------------------------------------------------------- kd-tune invocations


def parse_kd_tune(args: list[str]) -> argparse.Namespace | str:
    """The parsed arguments, or argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser().parse_args(args)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "refused"


@functools.cache
def kd_tune_calls() -> tuple[tuple[Command, argparse.Namespace | str], ...]:
    return tuple((cmd, parse_kd_tune(args)) for cmd, args in calls("kd-tune"))


def parsed_kd_tune_calls() -> list[tuple[Command, argparse.Namespace]]:
    return [(cmd, ns) for cmd, ns in kd_tune_calls() if isinstance(ns, argparse.Namespace)]


def sub_command(ns: argparse.Namespace) -> str:
    return " ".join(filter(None, (ns.command, getattr(ns, "action", None))))


@functools.cache
def call_config(config: str | None, overrides: tuple[str, ...]) -> Config:
    """The config a call runs with; a CONFIG argument is relative to the repository (the job's working_dir)."""
    return load_config(REPO / config if config else None, overrides=list(overrides), check_paths=False)


def config_of(ns: argparse.Namespace) -> Config | None:
    if sub_command(ns) not in ("train", "teacher train", "sweep") or (ns.command == "sweep" and ns.resume):
        return None
    return call_config(ns.config, tuple(ns.set))


def storage_root(ns: argparse.Namespace) -> str | None:
    if ns.command == "sweep" and ns.resume:
        return posixpath.dirname(ns.resume.rstrip("/"))
    config = config_of(ns)
    if config is None:
        return None
    return (ns.storage if ns.command == "sweep" and ns.storage else None) or config.storage.root


def data_dir(ns: argparse.Namespace) -> str | None:
    if sub_command(ns) == "data synth":
        return ns.out
    config = config_of(ns)
    return config.data.root if config else None


def search_space_file(value: str) -> Path:
    """Where `--search-space VALUE` points, resolved like kd_tune.space.load_search_space from the repository."""
    path = REPO / value
    if not path.exists() and path.suffix == "":
        path = SEARCH_SPACE_DIR / f"{value}.yaml"
    return path.resolve()


def clean(path: str) -> str:
    return posixpath.normpath(path) if "://" not in path else path.rstrip("/")


# ---------------------------------------------------------------- Kubernetes and launcher shapes


def ray_cluster_specs() -> list[tuple[Document, dict]]:
    """Every RayCluster spec: of a RayCluster, inside a RayJob (rayClusterSpec) or a RayService."""
    return [(doc, node) for doc in documents() for _, node in walk(doc.tree)
            if isinstance(node, dict) and "headGroupSpec" in node and "workerGroupSpecs" in node]


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in spec["workerGroupSpecs"]]
    return [(name, group["template"]) for name, group in groups]


def containers(template: dict) -> list[dict]:
    return template.get("spec", {}).get("containers", [])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def from_secret(entry: dict | None) -> bool:
    return bool(entry) and "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {})


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def shared_mounts(template: dict) -> set[tuple[str, str]]:
    """(volume source, mountPath) of the network volumes a pod mounts."""
    spec = template.get("spec", {})
    sources = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") or v.get("nfs", {}).get("path")
               for v in spec.get("volumes", [])}
    return {(sources[m["name"]], m["mountPath"].rstrip("/")) for c in spec.get("containers", [])
            for m in c.get("volumeMounts", []) if sources.get(m["name"])}


def rayjobs() -> list[Document]:
    return [doc for doc in documents() if isinstance(doc.tree, dict) and doc.tree.get("kind") == "RayJob"]


def launcher_configs() -> list[Document]:
    return [doc for doc in documents()
            if isinstance(doc.tree, dict) and "provider" in doc.tree and "available_node_types" in doc.tree]


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: str(r.specifier) for r in map(Requirement, deps)}


def pip_requirements(args: list[str]) -> list[Requirement | str]:
    """The requirements of `pip install ARGS`: Requirement objects, or the raw text of local paths and URLs."""
    reqs, it = [], iter(args[1:] if args[:1] == ["install"] else [])
    for arg in it:
        if arg in ("-e", "--editable"):
            reqs.append(next(it, ""))
        elif arg in PIP_OPTIONS_WITH_VALUE:
            next(it, None)
        elif not arg.startswith("-"):
            try:
                reqs.append(Requirement(arg))
            except InvalidRequirement:
                reqs.append(arg)
    return reqs


def pip_installs() -> list[tuple[str, int, list[Requirement | str]]]:
    """(group, position, requirements) of every pip install call, runtime_env `pip:` lists included."""
    found = [(cmd.group, i, pip_requirements(args)) for i, (cmd, args) in enumerate(calls("pip"))
             if args[:1] == ["install"]]
    for doc in documents():
        for path, node in walk(doc.tree):
            if path[-1:] == ("pip",) and isinstance(node, (list, dict)):
                packages = node.get("packages", []) if isinstance(node, dict) else node
                found.append((doc.label, -1, pip_requirements(["install", *packages])))
    return found


def names(reqs: list[Requirement | str]) -> set[str]:
    return {r.name for r in reqs if isinstance(r, Requirement)}


def is_local(req: Requirement | str) -> bool:
    return isinstance(req, str) or bool(req.url and req.url.startswith("file:"))


def ray_pin() -> str:
    return pyproject_pins()["ray"].removeprefix("==")


def ray_cli_error(args: list[str]) -> str | None:
    """Why Ray's own CLI refuses `ray ARGS`, or None."""
    import click
    from ray.scripts.scripts import cli

    command, rest, name = cli, list(args), "ray"
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        command, name = command.get_command(None, rest[0]), f"{name} {rest[0]}"
        if command is None:
            return f"no sub-command `{name}`"
        rest = rest[1:]
    try:
        command.make_context(name, rest)
    except click.ClickException as e:
        return e.format_message()
    return None


# ---------------------------------------------------------------- every file


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_yaml_files_parse(path):
    # Rule: every YAML file under cluster/ is valid YAML (safe loader) with at least one document.
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER_DIR.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_every_file_points_to_the_readme(path):
    # Rule: each deployment file opens with a comment naming the README section that explains it.
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert README_SECTION in " ".join(h.lstrip("# ") for h in header), \
        f"{path}: the leading comment must name README.md's section {README_SECTION!r}"


def test_the_expected_kinds_of_files_exist():
    # Rule: the checks below are not vacuous: there is a RayCluster spec, a RayJob, a launcher config and a sweep.
    assert ray_cluster_specs() and rayjobs() and launcher_configs()
    assert any(ns.command == "sweep" for _, ns in parsed_kd_tune_calls()), "no `kd-tune sweep` under cluster/"


# ---------------------------------------------------------------- commands


def test_kd_tune_commands_are_accepted_by_the_real_cli():
    # Rule: every kd-tune call names a real sub-command and only flags that kd_tune.cli.parser() accepts.
    refused = [f"{cmd.where}: `{shlex.join(cmd.argv)}`: {ns}" for cmd, ns in kd_tune_calls() if isinstance(ns, str)]
    assert not refused, "\n".join(refused)


def test_search_spaces_name_files_under_search_spaces():
    # Rule: every sweep's --search-space (or its default) is an existing file under search_spaces/.
    for cmd, ns in parsed_kd_tune_calls():
        if ns.command == "sweep" and not ns.resume:
            path = search_space_file(ns.search_space)
            assert path.is_file() and SEARCH_SPACE_DIR in path.parents, \
                f"{cmd.where}: --search-space {ns.search_space!r} is not a file under search_spaces/"


def test_configs_of_kd_tune_calls_are_valid():
    # Rule: a CONFIG argument is a repository file that validates with its --set overrides, and a sweep's search
    # space picks only teachers that config defines.
    from kd_tune.space import load_search_space

    for cmd, ns in parsed_kd_tune_calls():
        if getattr(ns, "config", None):
            assert (REPO / ns.config).is_file(), f"{cmd.where}: config {ns.config!r} is not a repository file"
        config = config_of(ns)
        if config is not None and ns.command == "sweep":
            load_search_space(search_space_file(ns.search_space)).check_teachers(config, source=cmd.where)


def test_calls_in_one_document_share_storage_root_and_data():
    # Rule: in one job, the sweep looks for teachers where `teacher train` saved them, a resumed experiment lies in
    # that root, and training reads the data set that `data synth` wrote, made with the config's synth settings.
    by_group: dict[str, list[argparse.Namespace]] = {}
    for cmd, ns in parsed_kd_tune_calls():
        by_group.setdefault(cmd.group, []).append(ns)
    for group, group_calls in by_group.items():
        roots = {clean(r) for r in map(storage_root, group_calls) if r}
        data = {clean(d) for d in map(data_dir, group_calls) if d}
        assert len(roots) <= 1, f"{group}: kd-tune calls use different storage roots {sorted(roots)}"
        assert len(data) <= 1, f"{group}: kd-tune calls use different data directories {sorted(data)}"
        for synth in (ns for ns in group_calls if sub_command(ns) == "data synth"):
            for config in filter(None, map(config_of, group_calls)):
                made = (synth.wakeword, synth.seed, synth.size)
                wanted = (config.data.wakeword, config.data.synth_seed, config.data.synth_size)
                assert made == wanted, f"{group}: data synth makes {made}, the config expects {wanted}"


def test_ray_commands_and_start_params_are_accepted_by_ray():
    # Rule: every `ray ...` command and every KubeRay rayStartParams entry is an option Ray's own CLI accepts.
    refused = [f"{cmd.where}: `{shlex.join(cmd.argv)}`: {err}" for cmd, args in calls("ray")
               if (err := ray_cli_error(args))]
    for doc in documents():
        for path, node in walk(doc.tree):
            if path[-1:] == ("rayStartParams",) and node:
                args = [f"--{k}" if str(v).lower() == "true" else f"--{k}={v}" for k, v in node.items()]
                if err := ray_cli_error(["start", *args]):
                    refused.append(f"{doc.label} {'.'.join(map(str, path))}: {err}")
    assert not refused, "\n".join(refused)


# ---------------------------------------------------------------- credentials


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER_DIR.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_no_credential_patterns_anywhere(path):
    # Rule: no credential is committed, not even in a comment (AWS key ids, private keys, passwords in URLs).
    text = path.read_text()
    for what, pattern in LEAKED.items():
        assert not pattern.search(text), f"{path}: holds {what}"


def literal_secret(value) -> bool:
    """A value that would be the secret itself, not a reference to where it is."""
    return isinstance(value, str) and value not in ("", PLACEHOLDER) and not value.startswith(("$", "/", "~/", "./"))


def secret_name(name) -> bool:
    return isinstance(name, str) and bool(SECRET_NAME.search(name)) and not REFERENCE_NAME.search(name)


def test_secret_named_keys_and_variables_hold_no_literal_values():
    # Rule: no credential inline: a secret-named key, or NAME=value in a command, never carries a literal value.
    found = []
    for doc in documents():
        for path, node in walk(doc.tree):
            placeholder_here = node == PLACEHOLDER and not in_example_secret(doc, path)
            if path and secret_name(path[-1]) and (literal_secret(node) or placeholder_here):
                found.append(f"{doc.label} {'.'.join(map(str, path))}")
            if isinstance(node, str):
                found += [f"{doc.label} {'.'.join(map(str, path))}: {name}=..."
                          for name, value in ASSIGNMENT_IN_TEXT.findall(node)
                          if secret_name(name) and literal_secret(value.strip("'\""))]
    assert not found, "literal secrets:\n" + "\n".join(found)


def in_example_secret(doc: Document, path: tuple) -> bool:
    return (".example." in doc.file.name and isinstance(doc.tree, dict) and doc.tree.get("kind") == "Secret"
            and path[:1] == ("stringData",))


def test_secret_looking_env_entries_come_from_secrets():
    # Rule: a container env entry that looks secret is filled by valueFrom.secretKeyRef, never by value.
    found = []
    for doc in documents():
        for path, node in walk(doc.tree):
            if path[-1:] == ("env",) and isinstance(node, list):
                found += [f"{doc.label} {'.'.join(map(str, path))}: {e['name']}" for e in node
                          if (secret_name(e.get("name")) or e.get("name") in SECRET_ENV) and not from_secret(e)]
    assert not found, "env entries that must use valueFrom.secretKeyRef:\n" + "\n".join(found)


def test_secret_objects_are_placeholder_examples():
    # Rule: Kubernetes Secrets are made with `kubectl create secret`; a committed one is an *.example.yaml whose
    # values are all REPLACE_ME.
    for doc in documents():
        if isinstance(doc.tree, dict) and doc.tree.get("kind") == "Secret":
            assert ".example." in doc.file.name, f"{doc.label}: a Secret outside an *.example.yaml file"
            assert not doc.tree.get("data"), f"{doc.label}: base64 `data` in an example Secret"
            values = doc.tree.get("stringData", {}).values()
            assert values and all(v == PLACEHOLDER for v in values), f"{doc.label}: values other than {PLACEHOLDER}"


# ---------------------------------------------------------------- KubeRay


def test_every_ray_container_uses_token_auth_from_a_secret():
    # Rule: auth is on: every Ray container (head and workers) sets RAY_AUTH_MODE=token and reads RAY_AUTH_TOKEN
    # from a Secret, so the whole cluster shares one token and nobody reaches it without.
    for doc, spec in ray_cluster_specs():
        for group, template in pod_templates(spec):
            for c in containers(template):
                env = env_of(c)
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{doc.label} {group}: RAY_AUTH_MODE"
                assert from_secret(env.get("RAY_AUTH_TOKEN")), f"{doc.label} {group}: RAY_AUTH_TOKEN not from a Secret"


def test_rayjob_submitter_authenticates():
    # Rule: the RayJob submitter is a Ray client of a token cluster, so it carries the token from the Secret.
    for doc in rayjobs():
        spec = doc.tree["spec"]
        if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            continue
        template = spec.get("submitterPodTemplate")
        assert template, f"{doc.label}: K8sJobMode needs a submitterPodTemplate carrying the token"
        for c in containers(template):
            env = env_of(c)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token" and from_secret(env.get("RAY_AUTH_TOKEN")), \
                f"{doc.label}: submitter {c.get('name')} lacks RAY_AUTH_MODE=token / RAY_AUTH_TOKEN from a Secret"


def test_gpu_worker_groups_request_gpus():
    # Rule: each Ray cluster has a CPU worker group and a GPU group that asks Kubernetes for nvidia.com/gpu,
    # tolerates the GPU taint and runs a -gpu image.
    for doc, spec in ray_cluster_specs():
        groups = [(g.get("groupName"), g["template"]) for g in spec["workerGroupSpecs"]]
        gpu = [(name, t) for name, t in groups if any(gpu_limit(c) for c in containers(t))]
        assert gpu, f"{doc.label}: no worker group has an nvidia.com/gpu limit"
        assert len(gpu) < len(groups), f"{doc.label}: no CPU worker group"
        for name, template in gpu:
            tolerated = {t.get("key") for t in template["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerated, f"{doc.label} {name}: no toleration for nvidia.com/gpu"
            for c in containers(template):
                requested = c["resources"].get("requests", {}).get("nvidia.com/gpu", c["resources"]["limits"].get(
                    "nvidia.com/gpu"))
                assert gpu_limit(c) >= 1 and int(requested) == gpu_limit(c), f"{doc.label} {name}: GPU request"
                assert "gpu" in c["image"].rpartition(":")[2], f"{doc.label} {name}: image {c['image']} is not -gpu"


def test_every_pod_mounts_the_same_shared_volume():
    # Rule: a local path works across nodes only on a volume every pod mounts at the same path.
    for doc, spec in ray_cluster_specs():
        mounts = {group: shared_mounts(t) for group, t in pod_templates(spec)}
        assert len({frozenset(m) for m in mounts.values()}) == 1, f"{doc.label}: pods mount differently: {mounts}"


def test_rayjob_local_paths_lie_on_the_shared_volume():
    # Rule: a job's local data and storage paths lie on the shared volume: a path on the head's own disk fails at
    # the first checkpoint a worker saves (relative paths resolve in a working_dir only the head has).
    for doc, spec in ray_cluster_specs():
        mounts = set.intersection(*(shared_mounts(t) for _, t in pod_templates(spec)))
        for cmd, ns in parsed_kd_tune_calls():
            if cmd.group == doc.label:
                for path in filter(None, (storage_root(ns), data_dir(ns))):
                    assert "://" in path or any(clean(path).startswith(f"{m}/") for _, m in mounts), (
                        f"{cmd.where}: {path!r} is not under a volume every pod mounts ({sorted(mounts)}; a "
                        "relative path resolves in a working_dir only the head has)")


def test_rayjobs_are_bounded():
    # Rule: a RayJob frees its cluster when done, cannot run forever, and says how often it is retried.
    for doc in rayjobs():
        spec = doc.tree["spec"]
        assert spec.get("shutdownAfterJobFinishes") is True, f"{doc.label}: shutdownAfterJobFinishes"
        deadline = spec.get("activeDeadlineSeconds")
        assert isinstance(deadline, int) and deadline > 0, f"{doc.label}: activeDeadlineSeconds"
        assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 0, f"{doc.label}: backoffLimit"


def test_rayjob_runtime_env_holds_no_secrets_and_stops_gracefully():
    # Rule: runtime_env env_vars are shown by `ray job list`, so they hold no secrets; SIGINT with a wait lets the
    # Tune driver save its state on `ray job stop`; pip entries are portable (no file:// paths).
    for doc in rayjobs():
        runtime_env = yaml.safe_load(doc.tree["spec"].get("runtimeEnvYAML") or "{}")
        env_vars = runtime_env.get("env_vars", {})
        secret = [n for n in env_vars if secret_name(n) or n in SECRET_ENV or n.startswith("AWS_")]
        assert not secret, f"{doc.label}: secrets in runtime_env env_vars: {secret}"
        assert env_vars.get("RAY_JOB_STOP_SIGNAL") == "SIGINT", f"{doc.label}: RAY_JOB_STOP_SIGNAL=SIGINT missing"
        assert int(env_vars.get("RAY_JOB_STOP_WAIT_TIME_S", 0)) > 3, f"{doc.label}: RAY_JOB_STOP_WAIT_TIME_S"
        pip = runtime_env.get("pip", [])
        pip = pip.get("packages", []) if isinstance(pip, dict) else pip
        assert not [p for p in pip if "file://" in p], f"{doc.label}: a runtime_env pip entry names a local file"


def test_ray_versions_match_the_pin():
    # Rule: the cluster runs the Ray that pyproject.toml pins, on Python 3.11: a client and cluster of different
    # Ray versions cannot talk. Custom images are built FROM such an image.
    version = ray_pin()
    images = [(doc.label, node) for doc in documents() for path, node in walk(doc.tree)
              if path[-1:] == ("image",) and isinstance(node, str)]
    images += [(str(f.relative_to(REPO)), image) for f in dockerfiles() for image in dockerfile_images(f)]
    for where, image in images:
        if image.startswith("rayproject/ray"):
            assert image.partition(":")[2].startswith(f"{version}-py311"), f"{where}: {image} is not Ray {version}"
    for f in dockerfiles():
        assert all(i.startswith("rayproject/ray:") for i in dockerfile_images(f)), f"{f}: not built on Ray's image"
    for doc in documents():
        for path, node in walk(doc.tree):
            if path[-1:] == ("rayVersion",):
                assert str(node) == version, f"{doc.label}: rayVersion {node} != {version}"


# ---------------------------------------------------------------- installs


def test_torch_and_torchaudio_are_installed_together_with_the_pins():
    # Rule: torch and torchaudio go in one pip call with pyproject.toml's pins: a torch resolved on its own pulls
    # another multi-GB build.
    pins = pyproject_pins()
    for group, _, reqs in pip_installs():
        got = names(reqs)
        if got & set(TORCH_PAIR):
            assert set(TORCH_PAIR) <= got, f"{group}: torch and torchaudio in separate pip calls"
            for r in reqs:
                if isinstance(r, Requirement) and r.name in TORCH_PAIR:
                    assert str(r.specifier) == pins[r.name], f"{group}: {r} is not pinned as {pins[r.name]}"


def test_setup_installs_torch_before_kd_tune():
    # Rule: every setup sequence that installs kd_tune from the repository (launcher setup commands, Dockerfile)
    # first installs the torch pair, so kd_tune's requirements find it already there.
    installs, local = pip_installs(), {}
    for group, position, reqs in installs:
        if any(is_local(r) for r in reqs):
            local.setdefault(group, position)
    for group, first_local in local.items():
        torch_at = [p for g, p, reqs in installs if g == group and set(TORCH_PAIR) <= names(reqs)]
        assert torch_at and min(torch_at) < first_local, f"{group}: kd_tune is installed before torch/torchaudio"
    for doc in launcher_configs():
        assert doc.label in local, f"{doc.label}: the setup commands never install kd_tune"


# ---------------------------------------------------------------- cluster launcher


def test_launcher_configs_match_rays_schema():
    # Rule: a launcher config is one `ray up` accepts: Ray's own defaults merged in, then its JSON schema.
    from ray.autoscaler._private.util import prepare_config, validate_config

    for doc in launcher_configs():
        validate_config(prepare_config(copy.deepcopy(doc.tree)))


def test_launcher_starts_ray_with_token_auth():
    # Rule: auth is on: head and workers start Ray with RAY_AUTH_MODE=token (set on every node, consistently).
    for doc in launcher_configs():
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            starts = [cmd for cmd, args in calls("ray") if cmd.group == doc.label and cmd.path[:1] == (key,)
                      and args[:1] == ["start"]]
            assert starts, f"{doc.label}: no `ray start` in {key}"
            for cmd in starts:
                assert cmd.env.get("RAY_AUTH_MODE") == "token", f"{cmd.where}: ray start without RAY_AUTH_MODE=token"


def test_launcher_nodes_get_s3_access_from_instance_profiles():
    # Rule: nodes reach S3 through an IAM instance profile, never keys, and a GPU node type declares its GPU.
    for doc in launcher_configs():
        types = doc.tree["available_node_types"]
        for name, node_type in types.items():
            assert "IamInstanceProfile" in node_type["node_config"], f"{doc.label} {name}: no IamInstanceProfile"
        assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values()), f"{doc.label}: no GPU type"


def test_readme_creates_the_secrets_the_manifests_read():
    # Rule: following the README's `kubectl create secret` commands gives the pods every Secret name and key that
    # the KubeRay manifests read (a mismatch leaves the pods unable to start).
    created = set(re.findall(r"kubectl create secret generic (\S+) --from-literal=([\w.-]+)=",
                             (REPO / "README.md").read_text()))
    read = {(value["name"], value["key"]) for doc in documents() if "kuberay" in doc.label
            for path, value in walk(doc.tree) if path and path[-1] == "secretKeyRef"}
    assert read and created == read, f"README creates {sorted(created)}, the manifests read {sorted(read)}"
