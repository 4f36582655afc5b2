"""GPU health: device samples from a provider (NVML or scripted), judged by pure rules."""
