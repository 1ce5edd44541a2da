class VhostUserNet: pass
