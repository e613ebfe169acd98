"""What `duda report` reads from artifacts (`inputs`) and the figures it draws (`plots`)."""
