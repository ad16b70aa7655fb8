"""The method contract (semibench.contract) and ``semibench check-method``: every built-in method
passes; a plugin installed as an outside package is found through its entry point and passes; a
method that breaks the contract fails with one line naming the stage and what to change."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from semibench.checkmethod import MethodCheckFailed, check_method
from semibench.contract import method_class
from semibench.data.augment import VIEW_KINDS
from semibench.errors import ConfigError
from semibench.losses import supervised_loss
from semibench.method import Method, check_method_class
from semibench.registry import METHODS, Registry
from semibench.testing import toy_config
from semibench.train.engine import Trainer, done_record

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", METHODS.names())
def test_check_method_passes_for_every_builtin(name, tmp_path):
    lines = []
    seconds = check_method(name, tmp_path, report=lines.append)
    assert list(seconds) == ["contract", "build", "train", "resume", "evaluate"]
    assert lines[3].startswith("ok  resume") and "bit-identical" in lines[3]
    assert (tmp_path / "runs" / "straight" / "metrics.json").exists()


# ---------------------------------------------------------------------------- broken methods

class Base(Method):
    unlabeled_views = None

    def __init__(self, ctx, hp=None):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        ctx.add_optimizer(self.student.parameters())

    def training_step(self, batch, step):
        return {"loss": supervised_loss(self.student, batch)}


class EvaluatesAHead(Base):
    def inference_model(self):
        return self.student.classifier


class EvaluatesAnUntrainedNet(Base):
    def __init__(self, ctx, hp=None):
        super().__init__(ctx, hp)
        self.other = ctx.build_segmenter()

    def inference_model(self):
        return self.other


class NoStudent(Base):
    def __init__(self, ctx, hp=None):
        Method.__init__(self, hp)
        self.net = ctx.build_segmenter()
        ctx.add_optimizer(self.net.parameters())


class ForgetsItsGenerator(Base):
    """Draws input noise from a generator outside its state_dict: a resumed run restarts it."""

    def __init__(self, ctx, hp=None):
        super().__init__(ctx, hp)
        self.noise = torch.Generator().manual_seed(0)

    def training_step(self, batch, step):
        x = batch.labeled_image + 0.1 * torch.randn(batch.labeled_image.shape, generator=self.noise)
        return {"loss": torch.nn.functional.cross_entropy(self.student(x, project=False).logits,
                                                          batch.labeled_mask)}


@pytest.mark.parametrize("cls, stage, words", [
    (EvaluatesAHead, "build", "inference_model() must return a network built by ctx.build_segmenter()"),
    (NoStudent, "build", "the default returns self.student"),
    (EvaluatesAnUntrainedNet, "train", "the evaluated network (inference_model()) did not change"),
    (ForgetsItsGenerator, "resume", "differs from an uninterrupted one in student."),
])
def test_a_method_that_breaks_the_contract_fails_in_one_line(cls, stage, words, tmp_path):
    name = "_broken_" + cls.__name__.lower()
    with METHODS.temporarily({name: cls}):
        with pytest.raises(MethodCheckFailed) as err:
            check_method(name, tmp_path, report=lambda line: None)
    message = str(err.value)
    assert message.startswith(f"check-method {name}: {stage} failed: ") and words in message
    assert "\n" not in message


def test_the_registry_says_the_name_once():
    assert METHODS.get("cdcl").name == "cdcl" and METHODS.get("cdcl-scheme4").name == "cdcl-scheme4"
    assert METHODS.get("fullsup").name == "fullsup" and METHODS.get("suponly").name == "suponly"
    reg = Registry("method", "semibench.methods", "nothing.here", name_attr="name")

    class Says(Base):
        name = "other"
    with pytest.raises(ConfigError, match="says name = 'other' but is registered as 'mine'"):
        reg.register("mine")(Says)

    class Silent(Base):
        pass
    reg.register("mine")(Silent)
    assert Silent.name == "mine"


def test_declared_views_and_batches_are_checked_once():
    class Bad:
        name, unlabeled_views, unlabeled_batches = "bad", "weak_strongg", 1
    with pytest.raises(ConfigError, match="unlabeled_views='weak_strongg', not a view kind; known: "):
        check_method_class(Bad, VIEW_KINDS)
    Bad.unlabeled_views, Bad.unlabeled_batches = "single", 0
    with pytest.raises(ConfigError, match="unlabeled_batches=0; it must be an integer >= 1"):
        check_method_class(Bad, VIEW_KINDS)
    Bad.unlabeled_views, Bad.unlabeled_batches = None, 2
    with pytest.raises(ConfigError, match="unlabeled_batches=2 but no unlabeled_views"):
        check_method_class(Bad, VIEW_KINDS)
    for name in METHODS.names():  # every registered method passes
        method_class(name)


def test_view_options_are_checked_against_the_view_kind():
    cls = type("BadOptions", (Base,), {"unlabeled_views": "two_crops", "view_options": {"strid": 8}})
    with METHODS.temporarily({"_bad_options": cls}):
        with pytest.raises(ConfigError, match="declares view_options strid that view kind 'two_crops' "
                                              "does not take; it takes: .*stride"):
            method_class("_bad_options")


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).unlabeled_views])
def test_every_method_gets_exactly_its_view_kinds_keys(name, toy_root, tmp_path):
    # what replaced the methods' own checks of their views: the engine builds the declared kind
    cls = METHODS.get(name)
    tr = Trainer(toy_config(toy_root, name), tmp_path)
    batch = tr.batches.batch(1, 0)
    keys = {"single": {"image"}, "two_crops": {"crop1", "crop2", "box1", "box2", "flip1", "flip2"},
            "weak_strong": {"weak", "strong"} | {f"strong_{k}" for k in
                                                 range(2, cls.view_options.get("strong_views", 1) + 1)}}
    assert set(batch.unlabeled) == keys[cls.unlabeled_views]
    assert len(batch.unlabeled_batches()) == cls.unlabeled_batches


# ---------------------------------------------------------------------------- several unlabeled batches

class ThreeBatches(Method):
    name = "_test_three"
    Hparams = type(None)
    unlabeled_views = "single"
    unlabeled_batches = 3

    def __init__(self, ctx, hp):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        ctx.add_optimizer(self.student.parameters())

    def training_step(self, batch, step):
        assert len(batch.unlabeled_batches()) == 3
        return {"loss": self.student(batch.labeled_image, project=False).logits.mean()}


def test_engine_refuses_bad_declarations_at_construction(toy_root, tmp_path):
    bad = type("BadViews", (ThreeBatches,), {"name": "_test_bad", "unlabeled_views": "nope"})
    with METHODS.temporarily({"_test_bad": bad}), \
            pytest.raises(ConfigError, match="method '_test_bad' declares unlabeled_views='nope'"):
        Trainer(toy_config(toy_root, "_test_bad"), tmp_path)


def test_engine_draws_n_unlabeled_batches(toy_root, tmp_path):
    with METHODS.temporarily({"_test_three": ThreeBatches}):
        tr = Trainer(toy_config(toy_root, "_test_three", batch_labeled=2, batch_unlabeled=2), tmp_path)
        tr.train_step(0, 0)
    assert tr.images_per_step == 2 + 3 * 2
    assert done_record(tr, [], "", 0.0)["unlabeled_per_step"] == 3 * 2  # the report's "trained on unlabeled"
    sup = Trainer(toy_config(toy_root, "suponly", batch_unlabeled=2), tmp_path / "sup")
    assert done_record(sup, [], "", 0.0)["unlabeled_per_step"] == 0
    batch = tr.batches.batch(0, 1)
    views = [v["image"] for v in batch.unlabeled_batches()]
    assert len(views) == 3 and all(v.shape == (2, 3, 64, 64) for v in views)
    assert not views[1].equal(views[2])  # independent draws
    assert all(a.equal(b) for a, b in zip(views, [v["image"] for v in tr.batches.batch(0, 1).unlabeled_batches()]))


# ---------------------------------------------------------------------------- plugins

PLUGIN = '''
    """An outside package's method: Mean Teacher's consistency on the single view."""
    from dataclasses import dataclass

    import torch

    from semibench.losses import softmax_mse, supervised_loss
    from semibench.method import Method


    @dataclass
    class Hparams:
        weight: float = 0.5


    class PluggedTeacher(Method):
        Hparams = Hparams
        unlabeled_views = "single"

        def __init__(self, ctx, hp=None):
            super().__init__(hp)
            self.student = ctx.build_segmenter()
            self.teacher = ctx.ema_of(self.student)
            ctx.add_optimizer(self.student.parameters())

        def training_step(self, batch, step):
            L_sup = supervised_loss(self.student, batch)
            if not step.unsup_active:
                return {"loss": L_sup}
            x = batch.unlabeled["image"]
            with torch.no_grad():
                target = self.teacher(x, project=False).logits
            L_cons = softmax_mse(self.student(x, project=False).logits, target)
            return {"loss": L_sup + self.hp.weight * L_cons, "L_cons": L_cons.detach()}
'''


def _install_plugin(site: Path) -> None:
    """An outside package, found the way pip installs one: a module and a dist-info folder whose
    entry_points.txt names its methods."""
    (site / "plugged_method").mkdir(parents=True)
    (site / "plugged_method" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (site / "broken_plugin.py").write_text("import a_library_nobody_installed\n")
    info = site / "plugged_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugged-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[semibench.methods]\nplugged = plugged_method:PluggedTeacher\n"
                                           "broken = broken_plugin:Method\n")


def _semibench(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "semibench", *args], capture_output=True, text=True,
                          env=env, cwd=site, timeout=600)


def test_check_method_for_an_outside_plugin_package(tmp_path):
    site = tmp_path / "site"
    _install_plugin(site)
    listed = _semibench(site, "methods")
    assert {"plugged", "broken", "cdcl"} <= set(listed.stdout.split())
    ok = _semibench(site, "check-method", "plugged")
    assert ok.returncode == 0, ok.stderr
    stages = [line.split()[1] for line in ok.stdout.splitlines() if line.startswith("ok  ")]
    assert stages == ["contract", "build", "train", "resume", "evaluate"]
    assert "plugged_method.PluggedTeacher" in ok.stdout and ok.stdout.splitlines()[-1].startswith(
        "check-method plugged: passed")
    broken = _semibench(site, "check-method", "broken")
    assert broken.returncode == 2 and broken.stdout == ""
    assert broken.stderr.strip().splitlines() == [
        "semibench: error: check-method broken: contract failed: method 'broken': its plugin 'broken_plugin:Method' (entry point group "  # noqa: E501
        "'semibench.methods') failed to import: ModuleNotFoundError: No module named "
        "'a_library_nobody_installed'"]
