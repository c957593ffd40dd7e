// Test-page entry: exposes Depict's published client, unchanged, on `window`.
// The test page constructs it itself (window.DPC) so that the test decides
// tenant, market and when the first event goes out. Importing this module
// already opens the client's WebSocket (utilishared creates it at load time).
// utilishared's two /v2/track senders (exported by the package, called by
// integrations) are exposed as they are, for the test to call.
import { DPC, version } from "@depict-ai/dpc";
import {
  send_product_unavailable_to_depict,
  send_transaction_id_to_depict,
  version_info,
} from "@depict-ai/utilishared";

window.DPC = DPC;
window.dpcVersion = version;
window.dpcVersionInfo = version_info;
window.utilishared = { send_transaction_id_to_depict, send_product_unavailable_to_depict };
