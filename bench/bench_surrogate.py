"""pycma's surrogate-assisted CMA-ES (lq-CMA-ES: `cma.fitness_models.SurrogatePopulation`) vs plain CMA-ES, for
BBT through the API at the same number of paid calls.

lq-CMA-ES fits a linear-quadratic model of the loss on the points evaluated so far and, each generation, pays
for true evaluations in the model's order only until the model ranks them well (Kendall tau); the rest of the
population gets the model's values. Whether that saves calls depends on how well a model in d dimensions fits
a few hundred points, so this runs both searches side by side (same seed, same prompt mapping, the calibrated
training loss that the default tuner uses) and records the best training loss against paid calls, the true
evaluations per generation, and the test accuracy of each search's best-on-train prompt.

    python bench/bench_surrogate.py --task sst2 --budget 200 --dims 500,50 --out bench/results/surrogate.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cma.fitness_models
import numpy as np
from bench_levers import served

from lmaas_client import LMaaSClient
from lmaas_client.evaluation import TaskScorer
from lmaas_client.tasks.data import load_task_data
from lmaas_client.tasks.files import resolve_task
from lmaas_client.tuners import make_tuner


class Spent(Exception):
    """The budget of paid calls is used up."""


class Objective:
    """z -> calibrated training loss, one paid call each; keeps the best point and the loss-vs-calls curve."""

    def __init__(self, scorer: TaskScorer, train, tuner, budget: int):
        self.scorer, self.train, self.tuner, self.budget = scorer, train, tuner, budget
        self.calls, self.best_loss, self.best_z, self.curve = 0, float("inf"), None, []
        self.best_calibration = None  # the best point's class bias, fitted on its training logits

    def __call__(self, z: np.ndarray) -> float:
        if self.calls >= self.budget:
            raise Spent
        scores = self.scorer.score(self.train, [self.tuner.prompt(z)], "ce", cached=True, calibrate=True)[0]
        self.calls += 1
        if scores.loss < self.best_loss:
            self.best_loss, self.best_z = scores.loss, np.array(z, dtype=np.float64)
            self.best_calibration = scores.calibration
        self.curve.append((self.calls, round(self.best_loss, 5)))
        return scores.loss


def search(scorer: TaskScorer, data, info, args, dim: int, surrogate: bool) -> dict:
    tuner = make_tuner("bbt", info, popsize=args.popsize, prompt_length=10, intrinsic_dim=dim, seed=args.seed)
    es, objective = tuner.es, Objective(scorer, data.train, tuner, args.budget)
    model = cma.fitness_models.SurrogatePopulation(objective) if surrogate else None
    true_evals, started = [], time.perf_counter()
    try:
        while objective.calls < args.budget:
            before = objective.calls
            points = es.ask()
            values = model(points) if model is not None else [objective(z) for z in points]
            es.tell(points, values)
            true_evals.append(objective.calls - before)
    except Spent:
        true_evals.append(objective.calls - before)
    best = tuner.prompt(objective.best_z)
    test = scorer.score(data.test, [best], "ce", cached=True, calibration=objective.best_calibration)[0]
    return {"dim": dim, "surrogate": surrogate, "calls": objective.calls, "generations": len(true_evals),
            "true_evals_per_generation": true_evals, "best_train_loss": objective.best_loss,
            "loss_at": {c: loss for c, loss in objective.curve if c in (25, 50, 100, 150, 200, 300, 500)},
            "test_acc": test.metric, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--dims", default="500,50", help="intrinsic dimensions d to compare at")
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    with served() as url, LMaaSClient(url, timeout=7200.0) as client:
        task = resolve_task(args.task)
        scorer = TaskScorer(client, task, "suffix")
        data = load_task_data(task, args.seed, None, "full")
        for dim in (int(d) for d in args.dims.split(",")):
            for surrogate in (False, True):
                done = {(r["task"], r["seed"], r["dim"], r["surrogate"], r["calls"]) for r in results}
                if (args.task, args.seed, dim, surrogate, args.budget) in done:
                    continue
                result = {"task": args.task, "seed": args.seed,
                          **search(scorer, data, client.model_info(), args, dim, surrogate)}  # fmt: skip
                print(json.dumps(result), flush=True)
                results.append(result)
                args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
