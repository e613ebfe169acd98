"""Network pieces shared by the training stages: losses, pseudo-label rules, the mean teacher."""
