"""The Docker engines pipeline deploys to: `engine` (connection, images, pulls, pushes,
builds) and `containers` (pipeline's container specs and their translation to Docker's API).
The only folder that imports the docker SDK (besides the lab); every SDK error leaves it as a
pipeline error kind naming the host."""
