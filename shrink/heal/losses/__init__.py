"""The healers (`heal=` options), one module each; `HEALERS` imports only this package, so choosing
and checking a healer loads neither peft nor transformers' Trainer."""
