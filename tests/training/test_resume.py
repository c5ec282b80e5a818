import torch

from kd_tune.training.resume import optimizer_from_safe, optimizer_to_safe


def test_an_optimizer_state_survives_the_split_into_tensors_and_json():
    # Rule: a checkpoint holds the optimizer as flat tensors plus JSON (no pickle), and loading them back gives the
    # state it was saved from, every slot and every hyper-parameter.
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
    assert all(isinstance(v, torch.Tensor) for v in tensors.values()) and len(tensors) == 3 * 4  # step, exp_avg(_sq)
    restored = optimizer_from_safe(tensors, json.loads(json.dumps(meta)))
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    fresh.load_state_dict(restored)
    again = fresh.state_dict()
    assert again["param_groups"] == json.loads(json.dumps(saved["param_groups"]))  # betas: a list, as JSON has it
    for param, slots in saved["state"].items():
        assert slots.keys() == again["state"][param].keys()
        assert all(torch.equal(slots[k], again["state"][param][k]) for k in slots)
