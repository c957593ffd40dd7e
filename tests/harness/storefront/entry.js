// Test-page entry: exposes Depict's published client, unchanged, on `window`.
// The test page constructs it itself (window.DPC) so that the test decides
// tenant, market and when the first event goes out. Importing this module
// already opens the client's WebSocket (utilishared creates it at load time).
import { DPC, version } from "@depict-ai/dpc";
import { version_info } from "@depict-ai/utilishared";

window.DPC = DPC;
window.dpcVersion = version;
window.dpcVersionInfo = version_info;
