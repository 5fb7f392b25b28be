"""MOON (Li, He and Song 2021, "Model-Contrastive Federated Learning"): local training pulls the local model's
representation of each sample towards the global model's and away from the client's previous local model's.

Client k minimises  task loss + mu * l_con  with, per sample,
    l_con = -log( exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)) )
where z, z_glob and z_prev are the sample's representations under the weights being trained, the round's global
weights and the weights the client returned the last time it trained (the global ones until it has), sim is the
cosine similarity, and l_con is averaged over the batch's real rows. The server is FedAvg's; it keeps each
client's last returned weights, as SCAFFOLD keeps c_i, because flexp's clients keep nothing between rounds.

The representation is the model's output (the logits): the `gradient` hook's batch gives only forward(params, x).
The paper contrasts a projection head's output on the features instead; a functional forward of such a head in
place of batch.forward for z, z_glob and z_prev would contrast it the same way. Written with the `gradient` hook,
as functional torch only, so it runs on the threads, Ray and vectorized engines alike. Its wire cost is FedAvg's:
a deployed client keeps its previous model itself.

    python -m flexp strategy=custom strategy._target_=flexp_examples.moon.MOON strategy.mu=1 strategy.tau=0.5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from flexp.algorithm import Algorithm, Batch, Params, client_tensors, tensors, unflatten
from flexp.client import ClientResult
from flexp.client_state import ClientStore


def contrastive(z: Tensor, z_glob: Tensor, z_prev: Tensor, tau: float) -> Tensor:
    """Per-sample l_con ([B] from [B, ...] representations): the cross-entropy of picking the global model's
    representation among the two."""
    z, z_glob, z_prev = (t.flatten(1) for t in (z, z_glob, z_prev))
    similarities = [torch.nn.functional.cosine_similarity(z, other, dim=-1) for other in (z_glob, z_prev)]
    return -torch.log_softmax(torch.stack(similarities, dim=-1) / tau, dim=-1)[..., 0]


class MOON(Algorithm):
    """Sends each client its previous local weights; the client adds mu * l_con to its task loss.

    mu = 1 is the default of the authors' code and the paper's value for CIFAR-100 and Tiny-ImageNet (5 for
    CIFAR-10; the paper has no MNIST experiment); tau = 0.5 is the paper's. mu = 0 is FedAvg.
    """

    mean_aggregate = False  # it keeps each client's own reply, not only their mean

    def __init__(self, num_clients: int, mu: float = 1.0, tau: float = 0.5) -> None:
        if mu < 0 or tau <= 0:
            raise ValueError(f"mu={mu!r} must be >= 0 and tau={tau!r} > 0")
        self.num_clients, self.mu, self.tau = num_clients, mu, tau
        self.previous = ClientStore()

    def message(self, client: int, round_: int, params: Tensor) -> dict[str, Tensor]:
        return {"previous": self.previous.get(client, params)}

    def client_init(self, params: Params, message: Mapping[str, Tensor]) -> dict[str, Any]:
        return {**message, "global": params, "previous": unflatten(message["previous"], params)}

    def gradient(self, batch: Batch, params: Params, cstate: dict[str, Any]) -> tuple[Params, Tensor, dict[str, Any]]:
        """Gradients of  loss(task) + mu * mean l_con; z_glob and z_prev are constants of the step."""
        x, y = self.batch(batch.x, batch.y, cstate)
        z_glob = batch.forward(cstate["global"], x).detach()
        z_prev = batch.forward(cstate["previous"], x).detach()

        def objective(p: Params) -> tuple[Tensor, Tensor]:
            output = batch.forward(p, x)
            task = batch.mean(batch.task_loss(output, y, reduction="none"))
            con = batch.mean(contrastive(output, z_glob, z_prev, self.tau))
            return self.loss(task, p, cstate) + self.mu * con, task

        grads, task = torch.func.grad(objective, has_aux=True)(params)
        return grads, task.detach(), cstate

    def aggregate(self, round_: int, params: Tensor, replies: Sequence[ClientResult]) -> Tensor:
        """FedAvg's mean; each replying client's weights become its previous local model."""
        self.previous.update({r.client: r.params for r in replies})
        return super().aggregate(round_, params, replies)

    def state_dict(self) -> dict[str, Any]:
        """{"previous": {client id: its last returned weights}}: tensors only, for weights_only checkpoints."""
        return {"previous": self.previous}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tensors({k: v for k, v in state.items() if k != "previous"}, "moon", ())
        self.previous = client_tensors(state, "previous", "moon", self.num_clients)
