"""The time-aware sound-event task: clips and questions, training the small model, evaluation."""
