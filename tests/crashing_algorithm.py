"""FedAvg whose client process dies (os._exit) in one given client in one given round: a lost Ray actor."""

from __future__ import annotations

import os

import torch

from flexp.algorithm import Algorithm


class ExitsInClient(Algorithm):
    """The process training `client` in round `round_` exits at once, as a killed or crashed worker would."""

    def __init__(self, client: int, round_: int) -> None:
        self.client, self.round = client, round_

    def message(self, client, round_, params):
        return {"exit": torch.tensor(client == self.client and round_ == self.round)}

    def client_init(self, params, message):
        if bool(message["exit"]):
            os._exit(1)
        return {}
