"""Policy training: batching sequences, the optimisation backend protocol, the PPO trainer and the RL loops."""
