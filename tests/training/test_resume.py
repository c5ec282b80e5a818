import torch

from kd_tune.store.checkpoint import load_checkpoint, save_checkpoint
from kd_tune.training.resume import optimizer_from_safe, optimizer_to_safe


def test_an_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    # Rule: a checkpoint holds the optimizer as flat tensors plus JSON (no pickle), and loading them back gives the
    # state it was saved from, every slot of every parameter and every hyper-parameter.
    import json

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
    saved = optimizer.state_dict()
    tensors, meta = optimizer_to_safe(saved)
    assert len(tensors) == 4 * 3  # step, exp_avg and exp_avg_sq of four parameters
    save_checkpoint(tmp_path, "c", {"optimizer": tensors}, kind="trial", config={}, extra={"optimizer": meta})
    loaded = load_checkpoint(tmp_path, "c")
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    fresh.load_state_dict(optimizer_from_safe(loaded.tensors["optimizer"], loaded.manifest["extra"]["optimizer"]))
    again = fresh.state_dict()
    assert again["param_groups"] == json.loads(json.dumps(saved["param_groups"]))  # betas: a list, as JSON has it
    for param, slots in saved["state"].items():
        assert slots.keys() == again["state"][param].keys()
        assert all(torch.equal(slots[k], again["state"][param][k]) for k in slots)
